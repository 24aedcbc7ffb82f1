"""qfusion: question-aware vision-token compression for vision-language models."""

from qfusion.adapters import attach, detach, lora_config, register_family
from qfusion.budget import Budget
from qfusion.config import FusionConfig
from qfusion.model import FusionOutput, FusionState, QuestionFusion
from qfusion.processor import QFusionProcessor

__version__ = "0.1.0"

__all__ = ["Budget", "FusionConfig", "FusionOutput", "FusionState", "QFusionProcessor", "QuestionFusion", "__version__",
           "attach", "detach", "lora_config", "register_family"]
