"""Reading tool calls out of model text. Model text is untrusted: nothing here raises or evaluates it.

* ``parse_tool_call(text)`` reads the JSON between ``<tool_call>`` and ``</tool_call>``:
  ``{"name": ..., "arguments": {...}}`` (arguments may also be a JSON string, OpenAI style) or the Hugging
  Face chat form ``{"type": "function", "function": {"name": ..., "arguments": ...}}``. Size and nesting
  depth are checked BEFORE ``json.loads`` (no recursion blow-ups), NaN/Infinity are refused.
* ``react_action(segment)`` finds the ``Action:`` / ``Action Input:`` of a GPT4Tools / VIoTGPT ReAct step
  (langchain's conversational-agent rule). It is the one place to delegate to ``toollmm.data.react``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class ParsedCall:
    name: str | None
    arguments: Any
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def json_depth(text: str) -> int:
    """Maximum bracket nesting of JSON text, ignoring brackets inside strings (linear, no recursion)."""
    depth = best = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def loads_limited(text: str, *, max_chars: int, max_depth: int) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(None, reason)``; never raises."""
    if not isinstance(text, str):
        return None, "call text is not a string"
    if len(text) > max_chars:
        return None, f"call is too long ({len(text)} characters > {max_chars})"
    depth = json_depth(text)
    if depth > max_depth:
        return None, f"JSON nested too deeply ({depth} levels > {max_depth})"
    try:
        return json.loads(text, parse_constant=_refuse_constant), None
    except (ValueError, RecursionError) as e:
        return None, f"not valid JSON ({str(e)[:200]})"


def parse_tool_call(text: str, *, max_chars: int = 16384, max_depth: int = 8) -> ParsedCall:
    value, err = loads_limited(
        text.strip() if isinstance(text, str) else text, max_chars=max_chars, max_depth=max_depth
    )
    if err:
        return ParsedCall(None, None, err)
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict):
        return ParsedCall(None, None, f"a tool call must be a JSON object, got {type(value).__name__}")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return ParsedCall(None, None, 'a tool call needs a "name" string')
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # OpenAI style: arguments serialised as a JSON string
        args, err = loads_limited(args or "{}", max_chars=max_chars, max_depth=max_depth)
        if err:
            return ParsedCall(name, None, f"arguments: {err}")
    if not isinstance(args, dict):
        return ParsedCall(name, None, f'"arguments" must be a JSON object, got {type(args).__name__}')
    return ParsedCall(name, args, None)


# --------------------------------------------------------------------------------------------- ReAct
#: the model stops writing and the tool runs when its step ends with this line
REACT_STOP_RE = re.compile(r"(?:^|\n)[ \t]*Observation:[ \t]*$")  # $ also matches before a final newline
_ACTION_LINE = re.compile(r"^[ \t]*Action[ \t]*:(.*)$", re.MULTILINE)
_INPUT_LINE = re.compile(r"^[ \t]*Action Input[ \t]*:(.*)$", re.MULTILINE)


@dataclass
class ReactAction:
    tool: str
    tool_input: str


def react_action(segment: str) -> ReactAction | None:
    """The first ``Action: X`` line and the ``Action Input: Y`` line after it, in one model step (the
    text before ``Observation:``), as langchain's conversational agent reads GPT4Tools / VIoTGPT output."""
    if not isinstance(segment, str):
        return None
    body = REACT_STOP_RE.sub("", segment)
    action = _ACTION_LINE.search(body)
    if action is None or not action.group(1).strip():
        return None
    given = _INPUT_LINE.search(body, action.end())
    if given is None:
        return None
    return ReactAction(action.group(1).strip(), given.group(1).strip().strip('"').strip())
