"""Attaching a QuestionFusion plugin to host models loaded with transformers.

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    adapter = qfusion.attach(model, FusionConfig(...))   # or a QuestionFusion, or a saved plugin directory
    processor = qfusion.QFusionProcessor(AutoProcessor.from_pretrained(checkpoint), model)

``attach`` finds the host's family in the registry by ``model.config.model_type``
(:func:`~qfusion.adapters.family.register_family`; each built-in family is a file of this folder
that registers its record: :mod:`~qfusion.adapters.llava`, :mod:`~qfusion.adapters.qwen_vl`,
:mod:`~qfusion.adapters.gemma`, ...); ``detach`` undoes it exactly. The generic parts are :mod:`~qfusion.adapters.adapter` (the seam,
run once for every family), :mod:`~qfusion.adapters.patching` (reversible patching),
:mod:`qfusion.plugin` (the plugin on disk, fitting a config to a host) and
:mod:`~qfusion.adapters.lora` (peft).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil

from torch import nn

from qfusion._versions import check_host_versions, check_minimum
from qfusion.adapters.adapter import FUSION_MODULE, HD_MODULE, HostAdapter, get_adapter, host_features, seam_outputs
from qfusion.adapters.cache import FusionCache
from qfusion.adapters.family import (FAMILIES, MODEL_TYPES, UNSUPPORTED, HostFamily, HostTokens, VisionSource,
                                     family_for, hosts_table, register_family, text_width)
from qfusion.adapters.lora import lora_config
from qfusion.adapters.patching import unwrap_model
from qfusion.config import FusionConfig
from qfusion.model import QuestionFusion
from qfusion.plugin import AdapterSettings, check_fit, check_int_pair, check_tokens, fit_config, read_plugin
from qfusion.vision import HDFrontEnd

for _module in pkgutil.iter_modules(__path__):  # every module here; the family files register their records
    importlib.import_module(f"{__name__}.{_module.name}")

BUILT_IN_FAMILIES = tuple(FAMILIES.values())
"""The families qfusion ships, in registration order (others are registered by users' code with
:func:`register_family`). Adding one is a file in this folder that registers its record."""

__all__ = ["BUILT_IN_FAMILIES", "FAMILIES", "FUSION_MODULE", "FusionCache", "HD_MODULE", "HostAdapter", "HostFamily", "HostTokens",
           "MODEL_TYPES", "UNSUPPORTED", "VisionSource", "attach", "detach", "family_for", "get_adapter",
           "host_features", "hosts_table", "lora_config", "register_family", "seam_outputs", "text_width"]


def attach(model: nn.Module, fusion, *, mode: str | None = None, vision_source: str | None = None, hd=None,
           train_vision_tower: bool = False, train_projector: bool = False, train_llm: bool = False,
           attn_impl: str = "auto", gradient_checkpointing: bool = False) -> HostAdapter:
    """Attach a QuestionFusion plugin to a transformers VLM instance; returns the adapter handle.

    model: a transformers VLM of a registered host family (``qfusion.adapters.MODEL_TYPES``; see the
        supported-hosts table in docs/hosts.md), before any peft wrapping. Only this instance is
        patched: its ``forward`` and ``generate`` then take ``qfusion_input_ids`` /
        ``qfusion_attention_mask``, ``qfusion_budget``, ``qfusion_image_counts`` and
        ``qfusion_cache``, and the fusion becomes the submodule ``model.qfusion``, which the host's
        own ``save_pretrained`` leaves out.
    fusion: a FusionConfig (``vision_dim`` / ``output_dim`` / ``text_vocab_size`` left at None are
        filled from the host; explicit values that disagree with the host are an error), a
        QuestionFusion (checked, kept where it is), or a plugin directory written by
        ``adapter.save_pretrained`` (settings restored, dims checked). New or loaded modules go to
        the device of the host's vision tower, in the host's dtype.
    mode: "replace" (default: fused tokens instead of the host's vision tokens) or, for the BLIP
        family, "augment" (after the Q-Former's query outputs).
    vision_source: where the fusion reads the host's vision features; the family's sources (LLaVA:
        "projector" (default) or "tower"; Qwen-VL: "merger" (default) or "tower"; others their
        default only).
    hd: LLaVA: an HD front-end, (rows, cols) to build one (``qfusion.vision.HDFrontEnd``), or None.
    train_vision_tower, train_projector, train_llm: which host parts keep ``requires_grad``
        (default: all frozen; the plugin trains). ``detach`` restores the previous flags.
    attn_impl, gradient_checkpointing: runtime choices for a fusion built or loaded here (a given
        QuestionFusion keeps its own).
    """
    check_host_versions()
    if unwrap_model(model) is not model:
        raise TypeError("model: attach qfusion to the transformers model before wrapping it with peft")
    family = family_for(model)
    if family.min_transformers is not None:
        check_minimum("transformers", family.min_transformers, f"the {family.name!r} host family")
    plugin = None
    if isinstance(fusion, (str, os.PathLike)):
        plugin = read_plugin(fusion)
        fusion = plugin.load_fusion(attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing)
    elif not isinstance(fusion, (FusionConfig, QuestionFusion)):
        raise TypeError(
            f"fusion: expected a FusionConfig, a QuestionFusion or a plugin directory, got {type(fusion).__name__}"
        )
    settings = _settings(family, model, None if plugin is None else plugin.settings, mode, vision_source, hd)
    adapter = HostAdapter(model, family, settings)
    settings = adapter.settings = _with_tokens(settings, adapter)
    tower = model.get_submodule(adapter.module_groups()["vision_tower"][0])
    device, dtype = next(tower.parameters()).device, model.dtype
    config = fusion if isinstance(fusion, FusionConfig) else fusion.config
    front = _front_end(settings, hd, plugin, adapter.feature_dim, config.vision_dim, device, dtype)
    host = {"vision_dim": front.out_dim if front is not None else adapter.feature_dim,
            "output_dim": adapter.fusion_output_dim, "text_vocab_size": adapter.llm_vocab_size}
    if isinstance(fusion, FusionConfig):
        config = fit_config(fusion, host)
        fusion = QuestionFusion(config, attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing)
        fusion = fusion.to(device=device, dtype=dtype)
    else:
        check_fit(fusion.config, host, "the plugin" if plugin is not None else "the QuestionFusion")
        if plugin is not None:
            fusion = fusion.to(device=device, dtype=dtype)
    trainable = {"vision_tower": train_vision_tower, "projector": train_projector, "llm": train_llm}
    adapter.install(fusion, front, trainable)
    return adapter


def detach(model: nn.Module) -> QuestionFusion:
    """Undo :func:`attach` exactly (methods, submodules, requires_grad flags, save rules); returns the fusion."""
    return get_adapter(model).uninstall()


def _settings(family: HostFamily, model: nn.Module, saved: AdapterSettings | None, mode: str | None,
              vision_source: str | None, hd) -> AdapterSettings:
    """Settings from the family's defaults, a saved plugin's settings and the explicit arguments
    (which must agree with a saved plugin's)."""
    model_type = model.config.model_type
    if saved is not None and saved.family != family.name:
        raise ValueError(
            f"fusion: the plugin was saved for a {saved.family!r} host ({saved.model_type}), this model is "
            f"{model_type!r} ({family.name!r} family)"
        )
    if mode is not None and mode not in family.modes:
        raise ValueError(f"mode: expected one of {family.modes} for a {model_type!r} host, got {mode!r}")
    if vision_source is not None:
        family.source(vision_source)
    if hd is not None and not family.hd:
        raise ValueError(f"hd: the high-resolution front-end is not offered for {model_type!r} hosts")
    grid = merge = None
    if isinstance(hd, HDFrontEnd):
        grid, merge = hd.grid, not isinstance(hd.local_merge, nn.Identity)
    elif hd is not None:
        grid, merge = check_int_pair(hd, "hd"), True
    settings = saved or AdapterSettings(family=family.name, model_type=model_type, mode=family.modes[0],
                                        vision_source=family.sources[0].name)
    updates = {"model_type": model_type}
    for name, value in (("mode", mode), ("vision_source", vision_source), ("hd_grid", grid)):
        if value is None:
            continue
        if saved is not None and getattr(saved, name) != value:
            raise ValueError(f"{name}: the plugin was trained with {name}={getattr(saved, name)!r}, got {value!r}")
        updates[name] = value
    if merge is not None:
        updates["hd_merge"] = merge
    return dataclasses.replace(settings, **updates)


def _with_tokens(settings: AdapterSettings, adapter: HostAdapter) -> AdapterSettings:
    """The settings with this host's token ids (saved with the plugin, so a processor can be built from it)."""
    tokens = adapter.tokens.to_json()
    check_tokens(settings, tokens, "the plugin")
    return dataclasses.replace(settings, tokens=tokens)


def _front_end(settings: AdapterSettings, hd, plugin, feature_dim: int, out_dim: int | None, device,
               dtype) -> HDFrontEnd | None:
    """The HD front-end a plugin uses: the one given, a new one, or the saved one of a plugin."""
    if settings.hd_grid is None:
        return None
    if isinstance(hd, HDFrontEnd):
        if hd.vision_dim != feature_dim:
            raise ValueError(f"hd: vision_dim={hd.vision_dim} does not fit the host features ({feature_dim})")
        return hd
    if plugin is not None:
        return plugin.load_hd(feature_dim, device, dtype)
    front = HDFrontEnd(feature_dim, settings.hd_grid, merge=settings.hd_merge, out_dim=out_dim or feature_dim)
    return front.to(device=device, dtype=dtype)
