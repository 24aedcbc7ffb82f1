"""The qfusion plugin a vLLM host config names, and whether it fits that host.

The host checkpoint stays untouched: the user names the plugin directory (written by
``adapter.save_pretrained`` and, optionally, ``QFusionProcessor.save_pretrained``) in the host's
config, normally through vLLM's ``hf_overrides={"qfusion_plugin": "/path/to/plugin"}``. Without that
field the model serves the host alone (all its vision tokens).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from qfusion import FusionConfig
from qfusion.adapters import ADAPTER_CONFIG_NAME, AdapterSettings
from qfusion.processor import PROCESSOR_CONFIG_NAME

PLUGIN_FIELD = "qfusion_plugin"
"""Host-config field (set with ``hf_overrides``) holding the plugin directory."""

QUESTION_END_FIELD = "qfusion_question_end"
"""Optional host-config field: the text that ends a user turn (default: read from the chat template)."""

ARCHITECTURE = "QFusionLlavaForConditionalGeneration"
"""The architecture name the vLLM plugin registers (set it with ``hf_overrides``)."""


@dataclass(frozen=True)
class PluginSpec:
    """What the vLLM model and processor need to know about a saved plugin.

    config: the fusion's FusionConfig (m, n, dims, vocabulary).
    vision_source: "projector" (the fusion reads the host features after its projector) or "tower".
    question_special_tokens / max_question_length / question_tokenizer_dir: how questions are
        tokenized, as ``QFusionProcessor`` saved them (host tokenizer, no special tokens, no limit
        when the plugin has no processor settings).
    """

    directory: str
    config: FusionConfig
    vision_source: str
    question_special_tokens: bool
    max_question_length: int | None
    question_tokenizer_dir: str | None


def plugin_directory(hf_config) -> str | None:
    """The plugin directory named in the host config, or None (serve the host alone)."""
    directory = getattr(hf_config, PLUGIN_FIELD, None)
    if directory is None:
        return None
    if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{PLUGIN_FIELD}: expected a directory holding a saved qfusion plugin, got {directory!r}"
        )
    return os.fspath(directory)


def read_plugin(directory: str) -> PluginSpec:
    """Read a plugin directory; refuses plugins that this vLLM model cannot run (not LLaVA, HD views)."""
    config = FusionConfig.from_pretrained(directory)
    settings = AdapterSettings.load(directory)
    if settings is None:
        raise FileNotFoundError(
            f"{PLUGIN_FIELD}: no {ADAPTER_CONFIG_NAME} in {directory!r}; save the plugin with adapter.save_pretrained"
        )
    if settings.family != "llava" or settings.model_type != "llava":
        raise ValueError(
            f"{PLUGIN_FIELD}: the plugin was saved for a {settings.model_type!r} host; the vLLM model serves "
            "plain 'llava' hosts"
        )
    if settings.hd_grid is not None:
        raise ValueError(
            f"{PLUGIN_FIELD}: the plugin uses the HD front-end (grid {settings.hd_grid}), which the vLLM model "
            "does not run"
        )
    processor = {}
    path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            processor = json.load(f)
        if processor.get("hd_grid"):
            raise ValueError(f"{path}: HD views are not supported by the vLLM model")
    tokenizer_dir = processor.get("question_tokenizer")
    return PluginSpec(
        directory=directory, config=config, vision_source=settings.vision_source,
        question_special_tokens=bool(processor.get("question_special_tokens", tokenizer_dir is not None)),
        max_question_length=processor.get("max_question_length"),
        question_tokenizer_dir=None if tokenizer_dir is None else os.path.join(directory, tokenizer_dir),
    )


def feature_dim(hf_config, vision_source: str) -> int:
    """Width of the host features the fusion reads: the LLM width after the projector, or the tower's."""
    if vision_source == "projector":
        return hf_config.text_config.hidden_size
    layers = hf_config.vision_feature_layer
    return hf_config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))


def check_fit(spec: PluginSpec, hf_config) -> None:
    """Raise a ValueError naming the mismatch when the plugin's dims do not fit the host."""
    wanted = {"vision_dim": feature_dim(hf_config, spec.vision_source),
              "output_dim": hf_config.text_config.hidden_size}
    for name, host in wanted.items():
        value = getattr(spec.config, name)
        if value != host:
            source = ("text_config.hidden_size" if name == "output_dim" or spec.vision_source == "projector"
                      else "vision_config.hidden_size")
            raise ValueError(
                f"{PLUGIN_FIELD}: the plugin at {spec.directory!r} has {name}={value}, this host needs "
                f"{name}={host} ({source}; vision_source={spec.vision_source!r})"
            )
