"""toollmm: train a multimodal, tool-using LLM end to end.

``toollmm.load(path_or_hub_id)`` returns a ready model for chat, tools and media generation
(the same loader as ``code/inference.py``); everything else lives in the submodules.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, **kwargs):
    """Load a stage folder, a released folder or a Hub id (see toollmm.checkpoint)."""
    from .infer.runtime import load as _load

    return _load(path, **kwargs)
