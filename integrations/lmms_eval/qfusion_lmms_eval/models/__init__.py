"""lmms-eval's plugin entry (``LMMS_EVAL_PLUGINS=qfusion_lmms_eval``): model name -> class in ``models/<name>.py``."""

AVAILABLE_MODELS = {"qfusion": "QFusionLMM"}
