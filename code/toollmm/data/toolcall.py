"""Canonical tool calls: one form for every source, one JSON text for training and evaluation.

A call is ``{"name": str, "arguments": {...}}``; inside a record it sits in an assistant message as
``tool_calls[i] = {"type": "function", "function": <call>}`` (the Hugging Face chat convention).
Calls that come from ReAct text (GPT4Tools, VIoT-Tool) keep the raw text as ``{"input": "<raw>"}``.

``canonical_json`` is THE text of a call: the token format renders ``<tool_call>{canonical_json}</tool_call>``,
the Jinja chat template writes the same bytes, and evaluation's "tool-call exact" compares it. The name comes
first (the model decides the tool before its arguments); argument keys are sorted at every level; no spaces;
non-ASCII kept as is.
"""

from __future__ import annotations

import json
from typing import Any

#: refuse to parse model output longer than this (a runaway generation, not a call)
MAX_CALL_CHARS = 100_000


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


def parse_tool_call_json(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse what a model wrote between ``<tool_call>`` and ``</tool_call>``.

    Returns ``(canonical call, None)`` or ``(None, reason)``; never raises, whatever the text. Accepted:
    ``{"name": str, "arguments": object}`` (arguments may be missing = ``{}``, or a JSON string holding an
    object, as some chat APIs write it). Anything else is reported, not guessed.
    """
    try:
        return _parse(text)
    except Exception as e:  # model output must never crash the caller
        return None, f"unparseable tool call ({type(e).__name__}: {e})"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(text: Any) -> tuple[dict[str, Any] | None, str | None]:
    if not isinstance(text, str):
        return None, f"tool call text must be a string, got {type(text).__name__}"
    if len(text) > MAX_CALL_CHARS:
        return None, f"tool call text is {len(text)} characters (limit {MAX_CALL_CHARS})"
    s = text.strip()
    if not s:
        return None, "empty tool call"
    try:
        obj = json.loads(s, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return None, f"tool call is not valid JSON: {e.msg} at character {e.pos}"
    if not isinstance(obj, dict):
        return None, f"tool call must be a JSON object, got {type(obj).__name__}"
    extra = sorted(set(obj) - {"name", "arguments"})
    if extra:
        return None, f"tool call has unexpected keys {extra} (expected name, arguments)"
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, "tool call has no name (a non-empty string)"
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args, parse_constant=_reject_constant) if args.strip() else {}
        except json.JSONDecodeError as e:
            return None, f"tool call {name!r}: arguments string is not JSON: {e.msg}"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None, f"tool call {name!r}: arguments must be a JSON object, got {type(args).__name__}"
    return {"name": name, "arguments": args}, None
