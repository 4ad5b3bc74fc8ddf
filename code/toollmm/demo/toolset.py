"""The demo's five tools as registered tools: ``inference.tool_imports: [toollmm.demo.toolset]``.

Each is an in-process, pure-Python backend answering exactly what the corpus's tool messages hold
(``json.dumps(run_demo_tool(name, arguments), sort_keys=True)``), so the demo model's calls really run.
``generate_image`` declares ``renders="image"``: with an image decoder loaded, the inference layer also
writes the file its result names. Specs (names, descriptions, JSON schemas) are ``tools.DEMO_TOOLS``.
"""

from __future__ import annotations

import json

from ..agent.spec import tool
from .tools import DEMO_TOOLS, run_demo_tool

RENDERS = {"generate_image": "image"}


def answer(name: str, arguments: dict) -> str:
    """A demo tool's reference result, as the corpus's tool messages hold it."""
    return json.dumps(run_demo_tool(name, arguments), sort_keys=True)


def _registered(entry: dict):
    fn = entry["function"]
    name = fn["name"]

    def run(**arguments) -> str:
        return answer(name, arguments)

    run.__name__ = run.__qualname__ = name
    run.__module__ = __name__
    mark = tool(name, fn["description"], fn["parameters"], isolation="inprocess", source="demo",
                renders=RENDERS.get(name))  # fmt: skip
    return mark(run)


calculator, unit_convert, weather, count_letters, generate_image = (_registered(t) for t in DEMO_TOOLS)
TOOL_FUNCTIONS = (calculator, unit_convert, weather, count_letters, generate_image)
