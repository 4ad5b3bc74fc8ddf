"""The synthetic demo corpus: coloured shapes, tones and moving shapes, their captions, instructions and
tool-use conversations, plus the demo LLM's tokenizer. Entry point: ``toollmm.data.demo_corpus``."""

from .corpus import FULL, SMALL, DemoSizes, generate_demo_corpus
from .tools import DEMO_TOOLS, TOOL_NAMES, run_demo_tool

__all__ = ["DEMO_TOOLS", "FULL", "SMALL", "TOOL_NAMES", "DemoSizes", "generate_demo_corpus", "run_demo_tool"]
