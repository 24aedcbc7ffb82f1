"""peft interop: LoRA on the host's LLM with the plugin kept trainable."""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from qfusion.adapters.adapter import FUSION_MODULE, HD_MODULE, get_adapter


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
