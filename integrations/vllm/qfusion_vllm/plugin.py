"""The qfusion plugin a vLLM host config names, read and fitted by qfusion's own plugin owner.

The host checkpoint stays untouched: the user names the plugin directory (written by
``adapter.save_pretrained`` and, optionally, ``QFusionProcessor.save_pretrained``) in the host's
config, normally through vLLM's ``hf_overrides={"qfusion_plugin": "/path/to/plugin"}``. Without that
field a model serves the host alone (all its vision tokens). The directory is read with
:func:`qfusion.plugin.read_plugin` and its widths checked with :func:`qfusion.plugin.check_fit`
against the widths the host family's record gives for this host config.
"""

from __future__ import annotations

import os

from qfusion.adapters import MODEL_TYPES
from qfusion.plugin import Plugin, check_fit, check_tokens, read_plugin

PLUGIN_FIELD = "qfusion_plugin"
"""Host-config field (set with ``hf_overrides``) holding the plugin directory."""

QUESTION_END_FIELD = "qfusion_question_end"
"""Optional host-config field: the text that ends a user turn (default: read from the chat template)."""

ARCHITECTURES = {
    "llava": "QFusionLlavaForConditionalGeneration",
    "qwen2_5_vl": "QFusionQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "QFusionQwen3VLForConditionalGeneration",
}
"""The architecture the vLLM plugin registers for each host ``model_type`` it serves."""


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


def architecture(model_type: str) -> str:
    """The registered architecture that serves hosts of ``model_type``."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type: the vLLM plugin serves {sorted(ARCHITECTURES)}, got {model_type!r}")
    return ARCHITECTURES[model_type]


def load_plugin(hf_config) -> Plugin | None:
    """The plugin the host config names, checked against that host; None when it names none.

    Refused, with an error naming the field and both values: a plugin saved for another host type,
    for other placeholder token ids, with the HD front-end or in ``augment`` mode, or whose
    ``vision_dim`` / ``output_dim`` differ from the host's (the family record's widths for the
    plugin's vision source).
    """
    directory = plugin_directory(hf_config)
    if directory is None:
        return None
    plugin = read_plugin(directory)
    settings, model_type = plugin.settings, hf_config.model_type
    source = f"{PLUGIN_FIELD} {directory!r}"
    if settings.model_type != model_type:
        raise ValueError(
            f"{source}: the plugin was saved for a {settings.model_type!r} host, this host is {model_type!r}"
        )
    if settings.hd_grid is not None:
        raise ValueError(f"{source}: the plugin uses the HD front-end (grid {settings.hd_grid}), which vLLM does not run")
    if settings.mode != "replace":
        raise ValueError(f"{source}: mode {settings.mode!r}; vLLM serves plugins in mode 'replace'")
    family = MODEL_TYPES[model_type]
    check_tokens(settings, family.tokens(hf_config).to_json(), f"the plugin at {directory!r} ({PLUGIN_FIELD})")
    width = family.output_dim(hf_config, settings) if family.output_dim else hf_config.get_text_config().hidden_size
    host = {"vision_dim": family.source(settings.vision_source).dim(hf_config, settings), "output_dim": width}
    check_fit(plugin.config, host, f"the plugin at {directory!r} ({PLUGIN_FIELD}, vision_source="
                                   f"{settings.vision_source!r})")
    return plugin
