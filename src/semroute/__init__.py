"""semroute: semantic routing of multi-layer LLM features into Diffusion Transformer blocks."""

from .dit import DIT_PRESETS, SemanticRoutingDiT
from .flow import RectifiedFlow
from .fusion import PAPER_IDS, STRATEGIES, LayerFusion
from .pipeline import SemanticRoutingPipeline
from .text_encoder import TextEncoder, TextEncoderConfig

__all__ = [
    "DIT_PRESETS",
    "PAPER_IDS",
    "STRATEGIES",
    "LayerFusion",
    "RectifiedFlow",
    "SemanticRoutingDiT",
    "SemanticRoutingPipeline",
    "TextEncoder",
    "TextEncoderConfig",
]
__version__ = "0.1.0"
