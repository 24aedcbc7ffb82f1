"""qfusion in lmms-eval: the ``qfusion`` model (a transformers VLM with a qfusion plugin attached).

Three ways to make lmms-eval find it:

* installed (``pip install -e integrations/lmms_eval``): the ``lmms_eval.models`` entry point
  returns :func:`manifest`;
* ``LMMS_EVAL_PLUGINS=qfusion_lmms_eval`` with this folder on ``PYTHONPATH`` (lmms-eval's older
  plugin mechanism, via :mod:`qfusion_lmms_eval.models`);
* in Python: :func:`register` before calling lmms-eval's evaluator.
"""

MODEL_NAME = "qfusion"
CLASS_PATH = "qfusion_lmms_eval.models.qfusion.QFusionLMM"


def manifest():
    """The lmms-eval model manifest of the ``qfusion`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Register the ``qfusion`` model in lmms-eval's model registry of this process."""
    from lmms_eval.models import AVAILABLE_MODELS, MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    AVAILABLE_MODELS[MODEL_NAME] = CLASS_PATH.rsplit(".", 1)[-1]
