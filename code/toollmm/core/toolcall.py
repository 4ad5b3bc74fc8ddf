"""Tool calls: the one canonical form, its one text, and THE parser of tool-call text.

A call is ``{"name": str, "arguments": {...}}``; inside a record it sits in an assistant message as
``tool_calls[i] = {"type": "function", "function": <call>}`` (the Hugging Face chat convention).
Calls that come from ReAct text (GPT4Tools, VIoT-Tool) keep the raw text as ``{"input": "<raw>"}``.

``canonical_json`` is THE text of a call: the token format renders ``<tool_call>{canonical_json}</tool_call>``,
the Jinja chat template writes the same bytes, and evaluation's "tool-call exact" compares it. The name comes
first (the model decides the tool before its arguments); argument keys are sorted at every level; no spaces;
non-ASCII kept as is.

``parse_tool_call`` decides what text between ``<tool_call>`` and ``</tool_call>`` is a call, for everyone:
the decode engine runs what it returns, the scorers count what it returns, the converters and the server
read call objects through ``call_from_value``. One set of rules (model text is untrusted; nothing here raises
or evaluates it):

* the text is at most ``MAX_CALL_CHARS`` characters and nests at most ``MAX_CALL_DEPTH`` levels (both
  checked BEFORE ``json.loads``: no recursion blow-up); NaN / Infinity are not JSON;
* the value is the canonical ``{"name", "arguments"}`` object, or the record form
  ``{"type": "function", "function": {"name", "arguments"}}`` (the two forms this project writes);
* ``name`` is a non-empty string; ``arguments`` is an object, a JSON string holding an object (the OpenAI
  API's serialisation, same limits), or missing / null / ``""`` (= ``{}``);
* any other key (``id``, a ``parameters`` alias, ``description``...) is an error: reported, not guessed
  (``{"name", "description", "parameters"}`` is a tool DEFINITION, which a model may echo from its prompt).

What a session allows to RUN is decided after parsing by the registry (known tool, schema, argument size
``inference.tool_max_arg_chars``, depth ``inference.tool_max_json_depth``), exactly as for an unknown tool:
the scorers still count such a call as parsed, because it is one.
"""

from __future__ import annotations

import json
from typing import Any

#: longest tool-call text that is parsed at all (a runaway generation, not a call); one limit for everyone
MAX_CALL_CHARS = 100_000
#: deepest bracket nesting of a call's JSON text (the call object is level 1); deeper is never parsed
MAX_CALL_DEPTH = 32
#: the name the engine reports for a call it could not read (nothing was parsed, so there is no name);
#: the scorers skip such entries of a ``--batch`` output
UNREAD = "?"

_WRAPPER_KEYS = {"type", "function"}
_CALL_KEYS = {"name", "arguments"}


def canonical_call(name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"name": name, "arguments": arguments}`` after checking both (raises ValueError on bad input)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"tool call name must be a non-empty string, got {name!r}")
    args = {} if arguments is None else arguments
    if not isinstance(args, dict):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object, got {type(args).__name__}")
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"tool call {name!r}: arguments are not JSON-serialisable: {e}") from None
    return {"name": name, "arguments": args}


def tool_call_entry(name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record form: ``{"type": "function", "function": canonical_call(...)}``."""
    return {"type": "function", "function": canonical_call(name, arguments)}


def _as_call(call: dict[str, Any]) -> dict[str, Any]:
    if isinstance(call, dict) and "function" in call and "name" not in call:
        call = call["function"]  # a tool_calls entry
    if not isinstance(call, dict) or "name" not in call:
        raise ValueError(f"not a tool call: {call!r}")
    return call


def canonical_json(call: dict[str, Any]) -> str:
    """The canonical text of a call (or of a ``tool_calls`` entry): ``{"name":"x","arguments":{...}}``."""
    c = _as_call(call)
    name = json.dumps(c["name"], ensure_ascii=False)
    args = json.dumps(c.get("arguments") or {}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return '{"name":' + name + ',"arguments":' + args + "}"


def arguments_text(arguments: dict[str, Any]) -> str:
    """The compact, key-sorted JSON of ``arguments`` (the part of ``canonical_json`` after the name)."""
    return json.dumps(arguments, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------- parsing
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_limited(
    text: Any, what: str = "tool call text", invalid: str = "not valid JSON"
) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(None, reason)`` for JSON text under the call limits; never raises."""
    if not isinstance(text, str):
        return None, f"{what} must be a string, got {type(text).__name__}"
    if len(text) > MAX_CALL_CHARS:
        return None, f"{what} is {len(text)} characters (limit {MAX_CALL_CHARS})"
    if not text.strip():
        return None, f"{what} is empty"
    depth = json_depth(text)
    if depth > MAX_CALL_DEPTH:
        return None, f"{what}: JSON nested too deeply ({depth} levels > {MAX_CALL_DEPTH})"
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except json.JSONDecodeError as e:
        return None, f"{invalid}: {e.msg} at character {e.pos}"
    except (ValueError, RecursionError) as e:
        return None, f"{invalid} ({type(e).__name__}: {str(e)[:200]})"


def call_from_value(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The canonical call of a decoded JSON value under the rules above: ``(call, None)`` or
    ``(None, reason)``; never raises."""
    if isinstance(value, dict) and "function" in value and "name" not in value:
        extra = sorted(set(value) - _WRAPPER_KEYS)
        if extra:
            return None, f"tool call has unexpected keys {extra} (expected type, function)"
        if value.get("type", "function") != "function":
            return None, f'tool call "type" must be "function", got {json.dumps(value["type"])[:60]}'
        value = value["function"]
    if not isinstance(value, dict):
        return None, f"tool call must be a JSON object, got {type(value).__name__}"
    extra = sorted(set(value) - _CALL_KEYS)
    if extra:
        return None, f"tool call has unexpected keys {extra} (expected name, arguments)"
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, "tool call has no name (a non-empty string)"
    args = value.get("arguments")
    if isinstance(args, str):  # the OpenAI API's form: the arguments serialised as a JSON string
        if not args.strip():
            args = {}
        else:
            where = f"tool call {name[:100]!r}: arguments string"
            args, err = loads_limited(args, where, f"{where} is not JSON")
            if err:
                return None, err
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None, f"tool call {name[:100]!r}: arguments must be a JSON object, got {type(args).__name__}"
    return {"name": name, "arguments": args}, None


def parse_tool_call(text: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Parse what a model wrote between ``<tool_call>`` and ``</tool_call>``: ``(canonical call, None)`` or
    ``(None, reason)``; never raises, whatever the text (the rules are in the module doc)."""
    try:
        value, err = loads_limited(text)
        return (None, err) if err else call_from_value(value)
    except Exception as e:  # model output must never crash the caller
        return None, f"unparseable tool call ({type(e).__name__}: {e})"
