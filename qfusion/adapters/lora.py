"""peft interop: LoRA on the host's LLM with the plugin kept trainable, and finding the module that runs."""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn


def active_module(module: nn.Module) -> nn.Module:
    """The module that actually runs: peft's ``modules_to_save`` wrapper stands for its active copy."""
    while hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
        active = getattr(module, "active_adapters", None)
        if active is None:  # peft releases that keep one active adapter name
            active = [module.active_adapter] if getattr(module, "active_adapter", None) else []
        if module.disable_adapters or not active:
            module = module.original_module
        else:
            module = module.modules_to_save[active[0]]
    return module


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers host inside a peft model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def lora_config(model: nn.Module, *, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05,
                target_modules: Sequence[str] = ("q_proj", "v_proj"), train_vision_tower: bool = False, **kwargs):
    """A peft ``LoraConfig`` for LoRA on the host's LLM that keeps the qfusion plugin trainable.

    The targets are a regex anchored at the LLM (``target_modules`` are the layer names inside it), so
    the vision tower's layers of the same names are not hit, and ``modules_to_save`` holds the plugin
    (``qfusion``, plus ``qfusion_hd`` with an HD front-end, plus the vision tower with
    ``train_vision_tower``): peft trains a copy of it, which the patched code looks up at every call.
    Other keyword arguments go to ``LoraConfig``.
    """
    from peft import LoraConfig

    from qfusion.adapters.base import FUSION_MODULE, HD_MODULE, get_adapter

    adapter = get_adapter(model)
    if isinstance(target_modules, str) or not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"target_modules: expected a non-empty list of layer names, got {target_modules!r}")
    names = "|".join(re.escape(t) for t in target_modules)
    pattern = rf"{re.escape(adapter.llm_name)}\..*\.(?:{names})"
    modules_to_save = [FUSION_MODULE] + ([HD_MODULE] if adapter.hd is not None else [])
    if train_vision_tower:
        modules_to_save += [name.rsplit(".", 1)[-1] for name in adapter.module_groups()["vision_tower"]]
    modules_to_save += [m for m in kwargs.pop("modules_to_save", None) or [] if m not in modules_to_save]
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern,
                      modules_to_save=modules_to_save, **kwargs)
