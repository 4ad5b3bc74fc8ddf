"""Converters from every supported public format into unified records (see data/README.md "Sources").

``REGISTRY`` maps a format name to its converter; :func:`convert_file` runs one over a file.
"""

from __future__ import annotations

from toollmm.data.convert import (  # noqa: F401
    alpaca,
    gpt4tools,
    lavia,
    llamafactory,
    llava,
    mllm_tool,
    nextgpt,
    unified,
    videochat,
    viot,
)

from .base import REGISTRY, Context, ConversionError, ConverterSpec, register
from .runner import ConvertStats, convert_file, iter_source

FORMATS: tuple[str, ...] = tuple(sorted(REGISTRY))

__all__ = [
    "FORMATS",
    "REGISTRY",
    "ConversionError",
    "ConvertStats",
    "Context",
    "ConverterSpec",
    "convert_file",
    "iter_source",
    "register",
]
