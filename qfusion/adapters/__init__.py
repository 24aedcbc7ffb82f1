"""Attaching a QuestionFusion plugin to host models loaded with transformers.

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    adapter = qfusion.attach(model, FusionConfig(...))   # or a QuestionFusion, or a saved plugin directory
    processor = qfusion.QFusionProcessor(AutoProcessor.from_pretrained(checkpoint), model)

``attach`` dispatches on ``model.config.model_type`` (:data:`ADAPTERS`); ``detach`` undoes it exactly.
The host internals are known only in the per-family files (:mod:`qfusion.adapters.llava`,
:mod:`qfusion.adapters.qwen_vl`, :mod:`qfusion.adapters.blip2`); the generic parts are :mod:`~qfusion.adapters.patching`
(reversible patching), :mod:`~qfusion.adapters.plugin` (the plugin on disk, fitting a config to a
host) and :mod:`~qfusion.adapters.lora` (peft).
"""

from __future__ import annotations

import os

from torch import nn

from qfusion._versions import check_host_versions
from qfusion.adapters.base import FUSION_MODULE, HD_MODULE, HostAdapter, get_adapter
from qfusion.adapters.blip2 import Blip2Adapter
from qfusion.adapters.cache import FusionCache
from qfusion.adapters.llava import LlavaAdapter
from qfusion.adapters.lora import lora_config, unwrap_model
from qfusion.adapters.plugin import (ADAPTER_CONFIG_NAME, AdapterSettings, build_hd, check_fit, fit_config, load_plugin,
                                     resolve_settings)
from qfusion.adapters.qwen_vl import QwenVLAdapter
from qfusion.config import FusionConfig
from qfusion.model import QuestionFusion

ADAPTERS: dict[str, type[HostAdapter]] = {
    model_type: adapter for adapter in (LlavaAdapter, QwenVLAdapter, Blip2Adapter) for model_type in adapter.model_types
}
"""Host ``config.model_type`` -> the adapter class that serves it."""

__all__ = ["ADAPTERS", "ADAPTER_CONFIG_NAME", "AdapterSettings", "Blip2Adapter", "FUSION_MODULE", "FusionCache",
           "HD_MODULE", "HostAdapter", "LlavaAdapter", "QwenVLAdapter", "attach", "detach", "get_adapter", "lora_config"]


def _host_placement(model: nn.Module, adapter: HostAdapter) -> tuple:
    """(device, dtype) for new plugin modules: where the host's vision features come out, in its dtype."""
    tower = model.get_submodule(adapter.module_groups()["vision_tower"][0])
    return next(tower.parameters()).device, model.dtype


def attach(model: nn.Module, fusion, *, mode: str | None = None, vision_source: str | None = None, hd=None,
           train_vision_tower: bool = False, train_projector: bool = False, train_llm: bool = False,
           attn_impl: str = "auto", gradient_checkpointing: bool = False) -> HostAdapter:
    """Attach a QuestionFusion plugin to a transformers VLM instance; returns the adapter handle.

    model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
        ``LlavaOnevisionForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
        ``Qwen3VLForConditionalGeneration``, ``Blip2ForConditionalGeneration`` or
        ``InstructBlipForConditionalGeneration`` (decoder-only LLM), before any peft wrapping. Only this instance is patched: its ``forward`` and
        ``generate`` then take ``qfusion_input_ids`` / ``qfusion_attention_mask``, ``qfusion_budget``
        and ``qfusion_cache``, and the fusion becomes the submodule ``model.qfusion``, which the host's
        own ``save_pretrained`` leaves out.
    fusion: a FusionConfig (``vision_dim`` / ``output_dim`` / ``text_vocab_size`` left at None are
        filled from the host; explicit values that disagree with the host are an error), a
        QuestionFusion (checked, kept where it is), or a plugin directory written by
        ``adapter.save_pretrained`` (settings restored, dims checked). New or loaded modules go to
        the device of the host's vision tower, in the host's dtype.
    mode: BLIP family: "replace" (default; fused tokens instead of the Q-Former's query outputs, into
        ``language_projection``) or "augment" (after them).
    vision_source: LLaVA family: "projector" (default; host features after its multimodal projector)
        or "tower" (the selected vision-tower features before it; not for LLaVA-OneVision, whose
        images are packed and video frames pooled after the projector). Qwen-VL: "merger" (default; the
        features after the patch merger, as its LLM receives them) or "tower" (the states before it).
    hd: LLaVA: an HD front-end, (rows, cols) to build one (``qfusion.vision.HDFrontEnd``), or None.
    train_vision_tower, train_projector, train_llm: which host parts keep ``requires_grad``
        (default: all frozen; the plugin trains). ``detach`` restores the previous flags.
    attn_impl, gradient_checkpointing: runtime choices for a fusion built or loaded here (a given
        QuestionFusion keeps its own).
    """
    check_host_versions()
    if unwrap_model(model) is not model:
        raise TypeError("model: attach qfusion to the transformers model before wrapping it with peft")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
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
        fusion.attn_impl, fusion.gradient_checkpointing = attn_impl, gradient_checkpointing
    elif not isinstance(fusion, (FusionConfig, QuestionFusion)):
        raise TypeError(
            f"fusion: expected a FusionConfig, a QuestionFusion or a plugin directory, got {type(fusion).__name__}"
        )
    settings = resolve_settings(adapter_cls, model_type, saved, mode, vision_source, hd)
    adapter = adapter_cls(model, settings)
    device, dtype = _host_placement(model, adapter)
    config = fusion if isinstance(fusion, FusionConfig) else fusion.config
    front = build_hd(settings, hd, adapter.feature_dim, config.vision_dim, directory, device, dtype)
    host = {"vision_dim": front.out_dim if front is not None else adapter.feature_dim,
            "output_dim": adapter.fusion_output_dim, "text_vocab_size": adapter.llm_vocab_size}
    if isinstance(fusion, FusionConfig):
        config = fit_config(fusion, host)
        fusion = QuestionFusion(config, attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing)
        fusion = fusion.to(device=device, dtype=dtype)
    else:
        check_fit(fusion, host, "the plugin" if directory is not None else "the QuestionFusion")
        if directory is not None:
            fusion = fusion.to(device=device, dtype=dtype)
    trainable = {"vision_tower": train_vision_tower, "projector": train_projector, "llm": train_llm}
    adapter.install(fusion, front, trainable)
    return adapter


def detach(model: nn.Module) -> QuestionFusion:
    """Undo :func:`attach` exactly (methods, submodules, requires_grad flags, save rules); returns the fusion."""
    return get_adapter(model).uninstall()
