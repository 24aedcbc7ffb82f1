"""vLLM plugin: LLaVA hosts served with a qfusion plugin (question-aware compressed vision tokens).

Installed, it registers the architecture ``QFusionLlavaForConditionalGeneration`` through vLLM's
``vllm.general_plugins`` entry point; select it and name the plugin directory with
``hf_overrides={"architectures": ["QFusionLlavaForConditionalGeneration"], "qfusion_plugin": DIR}``.
"""

from qfusion_vllm.plugin import ARCHITECTURE, PLUGIN_FIELD, QUESTION_END_FIELD

__all__ = ["ARCHITECTURE", "PLUGIN_FIELD", "QUESTION_END_FIELD", "hf_overrides", "register"]


def register() -> None:
    """Register the model with vLLM (run by vLLM in every process; safe to call more than once)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "qfusion_vllm.model:QFusionLlavaForConditionalGeneration")


def hf_overrides(plugin_dir: str | None = None, **extra) -> dict:
    """The ``hf_overrides`` that serve a LLaVA checkpoint with this model and, if given, a qfusion plugin."""
    overrides = {"architectures": [ARCHITECTURE], **extra}
    if plugin_dir is not None:
        overrides[PLUGIN_FIELD] = str(plugin_dir)
    return overrides
