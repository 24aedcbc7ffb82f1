"""Attaching a QuestionFusion plugin to host models loaded with transformers.

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    adapter = qfusion.attach(model, FusionConfig(...))   # or a QuestionFusion, or a saved plugin directory
    processor = qfusion.QFusionProcessor(AutoProcessor.from_pretrained(checkpoint), model)

``attach`` dispatches on ``model.config.model_type`` (:data:`ADAPTERS`); ``detach`` undoes it exactly.
The host internals are known only in this package: :mod:`qfusion.adapters.llava` and
:mod:`qfusion.adapters.blip2`.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from torch import nn

from qfusion.adapters.base import (
    ADAPTER_CONFIG_NAME,
    FUSION_MODULE,
    HD_MODULE,
    AdapterSettings,
    HostAdapter,
    _HANDLE,
    check_fit,
    fit_config,
    load_hd,
    load_plugin,
    resolve_settings,
    unwrap_model,
)
from qfusion.adapters.blip2 import Blip2Adapter
from qfusion.adapters.cache import FusionCache
from qfusion.adapters.llava import LlavaAdapter
from qfusion.config import FusionConfig
from qfusion.model import QuestionFusion
from qfusion.vision import HDFrontEnd

ADAPTERS: dict[str, type[HostAdapter]] = {
    model_type: adapter for adapter in (LlavaAdapter, Blip2Adapter) for model_type in adapter.model_types
}
"""Host ``config.model_type`` -> the adapter class that serves it."""

__all__ = ["ADAPTERS", "ADAPTER_CONFIG_NAME", "AdapterSettings", "Blip2Adapter", "FusionCache", "HostAdapter",
           "LlavaAdapter", "attach", "detach", "get_adapter", "lora_config"]


def _host_placement(model: nn.Module, adapter: HostAdapter) -> tuple:
    """(device, dtype) for new plugin modules: where the host's vision features come out, in its dtype."""
    tower = model.get_submodule(adapter._module_groups()["vision_tower"][0])
    return next(tower.parameters()).device, model.dtype


def attach(model: nn.Module, fusion, *, mode: str | None = None, vision_source: str | None = None, hd=None,
           train_vision_tower: bool = False, train_projector: bool = False, train_llm: bool = False) -> HostAdapter:
    """Attach a QuestionFusion plugin to a transformers VLM instance; returns the adapter handle.

    model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
        ``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration`` (decoder-only
        LLM), before any peft wrapping. Only this instance is patched: its ``forward`` and
        ``generate`` then take ``qfusion_input_ids`` / ``qfusion_attention_mask`` (and
        ``qfusion_cache``), and the fusion becomes the submodule ``model.qfusion``, which the host's own
        ``save_pretrained`` leaves out.
    fusion: a FusionConfig (``vision_dim`` / ``output_dim`` left at their defaults are filled from the
        host, other values are checked; a default ``text_vocab_size`` becomes the LLM's vocabulary size,
        for questions tokenized by the host tokenizer), a QuestionFusion (checked, kept where it is), or a plugin
        directory written by ``adapter.save_pretrained`` (settings restored, dims checked). New or
        loaded modules go to the device of the host's vision tower, in the host's dtype.
    mode: BLIP family: "replace" (default; fused tokens instead of the Q-Former's query outputs, into
        ``language_projection``) or "augment" (after them).
    vision_source: LLaVA family: "projector" (default; host features after its multimodal projector)
        or "tower" (the selected vision-tower features before it).
    hd: LLaVA: an HD front-end, (rows, cols) to build one (``qfusion.vision.HDFrontEnd``), or None.
    train_vision_tower, train_projector, train_llm: which host parts keep ``requires_grad``
        (default: all frozen; the plugin trains). ``detach`` restores the previous flags.
    """
    if unwrap_model(model) is not model:
        raise TypeError("model: attach qfusion to the transformers model before wrapping it with peft")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model: qfusion has no adapter for model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {sorted(ADAPTERS)}"
        )
    adapter_cls = ADAPTERS[model_type]
    directory = saved = None
    if isinstance(fusion, (str, os.PathLike)):
        if not os.path.isdir(fusion):
            raise FileNotFoundError(f"fusion: {os.fspath(fusion)!r} is not a directory holding a saved qfusion plugin")
        directory = fusion
        fusion, saved = load_plugin(directory)
    elif not isinstance(fusion, (FusionConfig, QuestionFusion)):
        raise TypeError(
            f"fusion: expected a FusionConfig, a QuestionFusion or a plugin directory, got {type(fusion).__name__}"
        )
    settings = resolve_settings(adapter_cls, model_type, saved, mode, vision_source, hd)
    adapter = adapter_cls(model, settings)
    device, dtype = _host_placement(model, adapter)

    front = None
    if settings.hd_grid is not None:
        if isinstance(hd, HDFrontEnd):
            front = hd
            if front.vision_dim != adapter.feature_dim:
                raise ValueError(
                    f"hd: vision_dim={front.vision_dim} does not fit the host features ({adapter.feature_dim})"
                )
        else:
            if isinstance(fusion, FusionConfig):
                default = FusionConfig.__dataclass_fields__["vision_dim"].default
                out_dim = adapter.feature_dim if fusion.vision_dim == default else fusion.vision_dim
            else:
                out_dim = fusion.config.vision_dim
            front = HDFrontEnd(adapter.feature_dim, settings.hd_grid, merge=settings.hd_merge, out_dim=out_dim)
            front = front.to(device=device, dtype=dtype)
            if directory is not None:
                load_hd(directory, front)
    vision_dim = front.out_dim if front is not None else adapter.feature_dim
    output_dim = adapter.fusion_output_dim
    if isinstance(fusion, FusionConfig):
        config = fit_config(fusion, vision_dim, output_dim, adapter.llm_vocab_size)
        fusion = QuestionFusion(config).to(device=device, dtype=dtype)
    else:
        check_fit(fusion, vision_dim, output_dim, "the plugin" if directory is not None else "the QuestionFusion")
        if directory is not None:
            fusion = fusion.to(device=device, dtype=dtype)
    adapter.install(fusion, front, train_vision_tower=train_vision_tower, train_projector=train_projector,
                    train_llm=train_llm)
    return adapter


def get_adapter(model: nn.Module) -> HostAdapter:
    """The adapter handle of a model with a qfusion plugin attached (also through a peft wrapper)."""
    adapter = unwrap_model(model).__dict__.get(_HANDLE)
    if adapter is None:
        host = type(unwrap_model(model)).__name__
        raise ValueError(f"model: no qfusion plugin attached to this {host}; call qfusion.attach first")
    return adapter


def detach(model: nn.Module) -> QuestionFusion:
    """Undo :func:`attach` exactly (methods, submodules, requires_grad flags, save rules); returns the fusion."""
    return get_adapter(model).uninstall()


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
        modules_to_save += [name.rsplit(".", 1)[-1] for name in adapter._module_groups()["vision_tower"]]
    modules_to_save += [m for m in kwargs.pop("modules_to_save", None) or [] if m not in modules_to_save]
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern,
                      modules_to_save=modules_to_save, **kwargs)
