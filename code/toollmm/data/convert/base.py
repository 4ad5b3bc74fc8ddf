"""What every converter shares: the error type, the per-file context, the registry and record builders.

A converter is a function ``(raw, ctx) -> list[record]`` registered under a format name with
:func:`register`. It may declare options (``--opt key=value`` on the command line) and a ``finish``
hook that sees all records of a file at once (MLLM-Tool merges repeated queries there).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from toollmm.core.errors import UserError
from toollmm.core.tokens import PLACEHOLDER, PLACEHOLDER_RE

from ...core.toolcall import tool_call_entry


class ConversionError(UserError, ValueError):
    """A source record cannot be converted; the message names the file and record."""


@dataclass
class Context:
    """What a converter knows about the file it converts."""

    path: Path
    fmt: str
    source: str
    options: dict[str, str] = field(default_factory=dict)
    media_root: Path | None = None
    where: str = ""  # "FILE:record N" of the record being converted
    index: int = 0  # 0-based position of that record in the file

    @property
    def stem(self) -> str:
        return self.path.stem

    def opt(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.options.get(key)
        if v is None:
            return default
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off"):
            return False
        raise ConversionError(f"option {key}={v!r}: expected true or false")

    def fail(self, message: str) -> ConversionError:
        return ConversionError(f"{self.where}: {message}")


Convert = Callable[[dict, Context], list[dict]]
Finish = Callable[[list[dict], Context], list[dict]]


@dataclass(frozen=True)
class ConverterSpec:
    name: str
    convert: Convert
    doc: str
    options: dict[str, str] = field(default_factory=dict)
    finish: Finish | None = None


REGISTRY: dict[str, ConverterSpec] = {}
COMMON_OPTIONS = {"task": "set every record's task (x2t, t2x, instruct)"}


def register(name: str, options: dict[str, str] | None = None, finish: Finish | None = None):
    """Decorator: register ``fn`` as the converter for format ``name`` (first docstring line = help)."""

    def deco(fn: Convert) -> Convert:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else name
        REGISTRY[name] = ConverterSpec(name, fn, doc, dict(options or {}), finish)
        return fn

    return deco


# ------------------------------------------------------------------------------------ raw access
def need(raw: dict, key: str, ctx: Context, kind: type | tuple[type, ...] = str):
    """``raw[key]`` with its type checked; a clear error naming the record otherwise."""
    if not isinstance(raw, dict):
        raise ctx.fail(f"expected a JSON object, got {type(raw).__name__}")
    if key not in raw:
        raise ctx.fail(f"missing key {key!r} (has {sorted(raw)[:12]})")
    v = raw[key]
    if not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ctx.fail(f"key {key!r}: expected {names}, got {type(v).__name__}")
    return v


def leftovers(raw: dict, used: set[str] | tuple[str, ...]) -> dict:
    """Source fields a converter did not map (kept in ``meta`` for provenance)."""
    return {k: v for k, v in raw.items() if k not in used}


def record_id(raw: dict, ctx: Context, key: str = "id", prefix: str = "") -> str:
    """The source id as a string (``<file stem>-<record index>`` when the source has none)."""
    v = raw.get(key) if isinstance(raw, dict) else None
    if v is None or v == "":
        return f"{ctx.stem}-{ctx.index}"
    return f"{prefix}{v}"


def make_record(rid: str, ctx: Context, messages: list[dict], **extra) -> dict:
    """A unified record; empty media lists, ``meta`` and ``eval`` are left out."""
    rec: dict = {"id": rid, "source": ctx.source, "messages": messages}
    for k in ("task", "images", "videos", "audios", "tools", "eval", "meta"):
        v = extra.pop(k, None)
        if v:
            rec[k] = v
    if extra:
        raise TypeError(f"unknown record fields {sorted(extra)}")
    if ctx.opt("task"):
        rec["task"] = ctx.opt("task")
    return rec


def tool_call(name: str, arguments: dict | None = None) -> dict:
    """One call in the schema's HF form (checked by toollmm.core.toolcall)."""
    return tool_call_entry(name, dict(arguments or {}))


def tool_spec(name: str, description: str | None = None, parameters: dict | None = None) -> dict:
    fn: dict = {"name": name}
    if description is not None:
        fn["description"] = description
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


# -------------------------------------------------------------------------------- conversations
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def sharegpt_messages(turns: list, ctx: Context, key: str = "conversations") -> list[dict]:
    """``[{from: human|gpt|system, value}]`` -> unified messages (LLaVA / ShareGPT convention)."""
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ctx.fail(f"{key}[{i}]: expected {{'from', 'value'}}, got {str(t)[:80]}")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise ctx.fail(f"{key}[{i}]: unknown speaker {t['from']!r} (known: {sorted(SHAREGPT_ROLES)})")
        if not isinstance(t["value"], str):
            raise ctx.fail(f"{key}[{i}]: value must be a string, got {type(t['value']).__name__}")
        msgs.append({"role": role, "content": t["value"]})
    if not msgs:
        raise ctx.fail(f"{key}: empty conversation")
    return msgs


def count_placeholders(messages: list[dict]) -> dict[str, int]:
    counts = {m: 0 for m in PLACEHOLDER}
    for msg in messages:
        for m in PLACEHOLDER_RE.findall(msg["content"]):
            counts[m] += 1
    return counts


def attach_media(messages: list[dict], modality: str, paths: list, ctx: Context) -> list:
    """Check that ``messages`` hold one ``<modality>`` placeholder per path. With none at all, prepend
    them to the first user turn (LLaVA's and LLaMA-Factory's convention); any other mismatch is an error."""
    n = count_placeholders(messages)[modality]
    if paths and n == 0:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ctx.fail(f"{len(paths)} {modality}(s) but no user turn to place them in")
        first["content"] = PLACEHOLDER[modality] * len(paths) + "\n" + first["content"]
    elif n != len(paths):
        raise ctx.fail(f"{n} {PLACEHOLDER[modality]} placeholder(s) for {len(paths)} {modality} file(s)")
    for p in paths:
        check_media(p, ctx)
    return paths


def check_media(path, ctx: Context) -> None:
    """With ``--media-root``, every referenced file must exist under it."""
    if isinstance(path, list):
        for p in path:
            check_media(p, ctx)
        return
    if not isinstance(path, str) or not path:
        raise ctx.fail(f"media path must be a non-empty string, got {path!r}")
    if ctx.media_root is not None and not os.path.exists(ctx.media_root / path):
        raise ctx.fail(f"missing media file {path!r} under --media-root {ctx.media_root}")


def strip_output_placeholder(text: str, modality: str) -> tuple[str, int]:
    """Remove ``<modality>`` marks that stand for a generated output (NExT-GPT writes 'Sure! <image>')."""
    pat = re.compile(r"\s*" + re.escape(PLACEHOLDER[modality]))
    out, n = pat.subn("", text)
    return out, n
