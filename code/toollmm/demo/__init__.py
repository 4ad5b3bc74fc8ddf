"""The demo: the whole system trained tiny on a synthetic corpus (``scripts/demo.sh``). Nothing outside
this package imports it; entry points (``code/prepare_data.py demo`` / ``demo-base``,
``code/evaluate.py demo``) and scripts do.

* ``corpus``  — the deterministic corpus: coloured shapes, tones and moving shapes, their captions,
  instructions and tool-use conversations, plus the demo LLM's tokenizer (``generate_demo_corpus``)
* ``media``   — draws the corpus's media: shapes (PNG), tones (WAV), moving shapes (MP4)
* ``text``, ``records`` — captions and turns; one unified-schema record builder per task
* ``tools``   — the five tools' specs, pure-Python backends and conversations
* ``toolset`` — the same tools registered through ``inference.tool_imports: [toollmm.demo.toolset]``
* ``base``    — the demo's base models (``toollmm.model.tiny`` + a tiny ImageBind calibrated on the corpus)
* ``eval``, ``report`` — held-out metrics of a stage folder; the run's ``metrics.json`` and summary table
* ``probe``   — can a frozen random tiny ImageBind see the corpus's attributes (a linear probe)
"""

from .corpus import FULL, SMALL, DemoSizes, generate_demo_corpus
from .tools import DEMO_TOOLS, TOOL_NAMES, run_demo_tool

__all__ = ["DEMO_TOOLS", "FULL", "SMALL", "TOOL_NAMES", "DemoSizes", "generate_demo_corpus", "run_demo_tool"]
