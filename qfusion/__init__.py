"""qfusion: question-aware vision-token compression for vision-language models."""

from qfusion.config import FusionConfig
from qfusion.model import FusionOutput, FusionState, QuestionFusion

__version__ = "0.1.0"

__all__ = ["FusionConfig", "FusionOutput", "FusionState", "QuestionFusion", "__version__"]
