"""vLLM plugin: LLaVA, Qwen2.5-VL and Qwen3-VL hosts served with a qfusion plugin (question-aware
compressed vision tokens).

Installed, it registers one architecture per served host type (``qfusion_vllm.ARCHITECTURES``)
through vLLM's ``vllm.general_plugins`` entry point; select it and name the plugin directory with
``hf_overrides=qfusion_vllm.hf_overrides(DIR)``.
"""

from qfusion_vllm.plugin import ARCHITECTURES, PLUGIN_FIELD, QUESTION_END_FIELD, architecture

__all__ = ["ARCHITECTURES", "PLUGIN_FIELD", "QUESTION_END_FIELD", "architecture", "hf_overrides", "register"]

_MODULES = {"llava": "qfusion_vllm.llava", "qwen2_5_vl": "qfusion_vllm.qwen_vl", "qwen3_vl": "qfusion_vllm.qwen_vl"}


def register() -> None:
    """Register the models with vLLM (run by vLLM in every process; safe to call more than once)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for model_type, name in ARCHITECTURES.items():
        if name not in supported:
            ModelRegistry.register_model(name, f"{_MODULES[model_type]}:{name}")


def hf_overrides(plugin_dir: str | None = None, *, model_type: str | None = None, **extra) -> dict:
    """The ``hf_overrides`` that serve a host checkpoint with the qfusion model for its type and, if
    given, a qfusion plugin.

    plugin_dir: the plugin directory (its saved settings name the host type), or None to serve the
        host alone. model_type: the host's ``config.model_type``; required without a plugin.
    extra: further host-config fields (e.g. ``qfusion_question_end``).
    """
    if plugin_dir is not None:
        from qfusion.plugin import read_plugin

        saved = read_plugin(plugin_dir).settings.model_type
        if model_type is not None and model_type != saved:
            raise ValueError(f"model_type: the plugin at {plugin_dir!r} was saved for {saved!r}, got {model_type!r}")
        model_type = saved
    if model_type is None:
        raise ValueError(f"model_type: required without a plugin_dir (one of {sorted(ARCHITECTURES)})")
    overrides = {"architectures": [architecture(model_type)], **extra}
    if plugin_dir is not None:
        overrides[PLUGIN_FIELD] = str(plugin_dir)
    return overrides
