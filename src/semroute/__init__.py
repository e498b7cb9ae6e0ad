"""semroute: semantic routing of multi-layer LLM features into Diffusion Transformer blocks.

The public names load on first use, so that `semroute --help` answers without importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "DIT_PRESETS": "dit",
    "SemanticRoutingDiT": "dit",
    "RectifiedFlow": "flow",
    "PAPER_IDS": "fusion",
    "STRATEGIES": "fusion",
    "LayerFusion": "fusion",
    "SemanticRoutingPipeline": "pipeline",
    "TextEncoder": "text_encoder",
    "TextEncoderConfig": "text_encoder",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'semroute' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
