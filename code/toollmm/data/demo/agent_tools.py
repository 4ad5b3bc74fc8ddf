"""The demo tools as agent tools: ``inference.tool_imports: [toollmm.data.demo.agent_tools]``.

Each ``@tool`` has the spec the corpus offers (``DEMO_TOOLS``) and returns exactly the text the corpus's
tool messages hold (``json.dumps(run_demo_tool(...), sort_keys=True)``), so a model trained on the demo
sees at inference what it saw in training. They are pure Python and deterministic, so they run
in-process (no sandbox subprocess per call).
"""

from __future__ import annotations

import json

from toollmm.agent.spec import tool

from .tools import DEMO_TOOLS, run_demo_tool

_SPEC = {t["function"]["name"]: t["function"] for t in DEMO_TOOLS}


def _demo_tool(name: str):
    return tool(name, _SPEC[name]["description"], _SPEC[name]["parameters"], isolation="inprocess")


def _result(name: str, **arguments) -> str:
    return json.dumps(run_demo_tool(name, arguments), sort_keys=True)


@_demo_tool("calculator")
def calculator(a, b, op):
    return _result("calculator", a=a, b=b, op=op)


@_demo_tool("unit_convert")
def unit_convert(value, from_unit, to_unit):
    return _result("unit_convert", value=value, from_unit=from_unit, to_unit=to_unit)


@_demo_tool("weather")
def weather(city, day):
    return _result("weather", city=city, day=day)


@_demo_tool("count_letters")
def count_letters(word, letter):
    return _result("count_letters", word=word, letter=letter)


@_demo_tool("generate_image")
def generate_image(prompt):
    return _result("generate_image", prompt=prompt)
