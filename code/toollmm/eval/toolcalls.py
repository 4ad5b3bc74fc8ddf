"""Tool calls as evaluation reads them: canonical JSON equality, calls out of any prediction format.

``canonical_json`` is THE text of a call (owned by ``toollmm.core.toolcall``: name first, argument keys
sorted at every level, no spaces, non-ASCII kept). Two calls are the same call when their canonical JSON is the same string; the
scorers and the demo's metrics compare calls only through :func:`same_call`.

A prediction's calls come from one of: the inference ``--batch`` output (``tool_calls: [{name, arguments,
result, error, duration_s}]``, without the entries the engine could not read: :func:`batch_calls`),
``<tool_call>{json}</tool_call>`` spans in raw model text, or ReAct text. Text is read by the parsers the
decode engine uses (``toollmm.core.toolcall.parse_tool_call``, ``toollmm.core.react``), so a call counts as
parsed here exactly when the engine would run it. Nothing here raises on model output.
"""

from __future__ import annotations

import json
import re
from typing import Any

from toollmm.core.react import call_input, react_calls
from toollmm.core.tokens import TOOL_CALL_END, TOOL_CALL_START
from toollmm.core.toolcall import UNREAD, canonical_json, parse_tool_call

__all__ = [
    "TOOL_CALL_SPAN",
    "batch_calls",
    "calls_from_prediction",
    "canonical_json",
    "first_tool_call",
    "input_text",
    "parse_tool_call",
    "same_call",
]

TOOL_CALL_SPAN = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


def same_call(a: dict, b: dict) -> bool:
    """Exact tool-call match: the canonical JSON texts are equal."""
    return canonical_json(a) == canonical_json(b)


def input_text(arguments: Any) -> str:
    """A call's arguments as ReAct ``Action Input`` text: the raw ``{"input": ...}`` of ReAct sources;
    other string/number arguments joined with ``", "`` in their order (the comma-separated argument
    convention of GPT4Tools and VIoTGPT); anything else as JSON."""
    if isinstance(arguments, str):
        return arguments
    if not isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    if set(arguments) == {"input"} and isinstance(arguments["input"], str):
        return call_input(arguments)
    if arguments and all(isinstance(v, (str, int, float)) for v in arguments.values()):
        return ", ".join(str(v) for v in arguments.values())
    return call_input(arguments)


def first_tool_call(text: str) -> tuple[dict | None, str | None]:
    """The first ``<tool_call>{...}</tool_call>`` span of raw model text: ``(call, None)``,
    ``(None, reason)`` when the span does not parse, ``(None, None)`` when there is no span."""
    m = TOOL_CALL_SPAN.search(text or "")
    if m is None:
        return None, None
    return parse_tool_call(m.group(1))


def batch_calls(pred: dict) -> list[dict]:
    """The calls of a prediction's ``tool_calls`` list as ``{"name", "arguments"}`` dicts (a
    ``{"function": ...}`` entry unwrapped), without the entries the engine could not read (name
    ``UNREAD``: the text did not parse, so there is no call) or that name no tool."""
    out = []
    for c in pred.get("tool_calls") or []:
        if isinstance(c, dict) and isinstance(c.get("function"), dict):
            c = c["function"]
        if isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"].strip() not in ("", UNREAD):
            out.append(c)
    return out


def calls_from_prediction(pred: dict) -> list[tuple[str, str]]:
    """``[(name, action input text)]`` of a prediction in the inference ``--batch`` format: its
    ``tool_calls``; else the ``<tool_call>`` spans of its text; else the ReAct steps of its text."""
    out = [(c["name"], input_text(c.get("arguments", {}))) for c in batch_calls(pred)]
    if out:
        return out
    text = pred.get("text") if isinstance(pred.get("text"), str) else ""
    for m in TOOL_CALL_SPAN.finditer(text):
        call, _ = parse_tool_call(m.group(1))
        if call is not None:
            out.append((call["name"], input_text(call["arguments"])))
    if out:
        return out
    return [(a.tool, a.tool_input) for a in react_calls(text)]
