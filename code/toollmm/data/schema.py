"""The unified record: JSON Schema (``data/schema.json``) + the semantic checks a schema cannot express.

``validate_record`` returns every problem of one record (empty list = valid); ``load_jsonl`` streams a JSONL
file of records, raising a ``RecordError`` that names file, line and record id, or skipping bad records
and counting them per reason. data/README.md documents the format with worked examples.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from toollmm.errors import NotUtf8, UserError, iter_text_lines

from ..paths import DATA_DIR
from ..tokens import MODALITIES, PLACEHOLDER_RE, SIGNAL_RE, TOOL_TOKENS

log = logging.getLogger(__name__)

SCHEMA_PATH = DATA_DIR / "schema.json"
MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios"}
ASSISTANT_ONLY = ("tool_calls", "thought", "generate", "train")
TOOL_ONLY = ("name",)

#: skip-count reasons, in the order problems are checked
REASONS = (
    "not_utf8",  # a line whose bytes are not UTF-8 text
    "json",
    "schema",
    "roles",
    "fields",
    "placeholders",
    "forbidden_token",
    "no_supervised_turn",
    "duplicate_id",
    "format",  # raised by the renderer: the chosen chat/tool format cannot express the record
    "overlong",  # raised or counted by the renderer
)


@dataclass(frozen=True)
class Problem:
    reason: str  # one of REASONS
    message: str


class RecordError(UserError, ValueError):
    """A record that cannot be used; the message names file, line and record id."""

    def __init__(self, where: str, record_id: str | None, problems: list[Problem]):
        self.where = where
        self.record_id = record_id
        self.problems = problems
        rid = f"record {record_id!r}" if record_id else "record without id"
        super().__init__(f"{where}: {rid}: " + "; ".join(p.message for p in problems))

    @property
    def reason(self) -> str:
        return self.problems[0].reason if self.problems else "schema"


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _path(err) -> str:
    out = ""
    for p in err.absolute_path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(record)"


def _schema_problems(record: Any) -> list[Problem]:
    errs = sorted(_validator().iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for e in errs:
        why = sorted({c.message for c in e.context or []})  # anyOf / oneOf: say what each branch wanted
        out.append(Problem("schema", f"{_path(e)}: {e.message}" + (f" ({'; or '.join(why)})" if why else "")))
    return out


def _role_problems(messages: list[dict]) -> list[Problem]:
    """Roles follow: [system] user assistant (tool* assistant)* ... ; a tool message answers a pending call."""
    out = [
        Problem("roles", f"messages[{i}]: a system message may only come first")
        for i, m in enumerate(messages)
        if m["role"] == "system" and i > 0
    ]
    prev, pending = None, 0
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            continue
        if prev is None:
            want = {"user"}
        elif prev == "user":
            want = {"assistant"}
        elif pending:
            want = {"tool"}
        else:
            want = {"user"} if prev == "assistant" else {"assistant"}
        if role not in want:
            if role == "tool":
                why = "a tool message must answer a tool call of the assistant message before it"
            elif pending:
                why = f"the assistant's tool call(s) still await {pending} tool message(s)"
            elif prev is None:
                why = "the conversation must start with a user message (after an optional system message)"
            else:
                why = f"expected {'/'.join(sorted(want))} after {prev}"
            out.append(Problem("roles", f"messages[{i}] ({role}): {why}"))
            return out
        if role == "assistant":
            pending = len(m.get("tool_calls") or [])
        elif role == "tool":
            pending -= 1
        prev = role
    return out


def _field_problems(messages: list[dict]) -> list[Problem]:
    out = []
    for i, m in enumerate(messages):
        role = m["role"]
        for k in ASSISTANT_ONLY:
            if k in m and role != "assistant":
                out.append(
                    Problem("fields", f"messages[{i}] ({role}): `{k}` is only allowed on assistant messages")
                )
        for k in TOOL_ONLY:
            if k in m and role != "tool":
                out.append(
                    Problem("fields", f"messages[{i}] ({role}): `{k}` is only allowed on tool messages")
                )
    return out


def _placeholder_problems(record: dict) -> list[Problem]:
    out = []
    counts = Counter()
    for i, m in enumerate(record["messages"]):
        found = PLACEHOLDER_RE.findall(m["content"])
        if found and m["role"] == "assistant":
            out.append(
                Problem(
                    "placeholders",
                    f"messages[{i}] (assistant): input placeholders <{found[0]}> cannot be in assistant text "
                    "(outputs are requested with `generate`)",
                )
            )
        counts.update(found)
    for m in MODALITIES:
        n_media = len(record.get(MEDIA_KEYS[m]) or [])
        if counts[m] != n_media:
            out.append(
                Problem(
                    "placeholders",
                    f"{counts[m]} <{m}> placeholder(s) in the messages but {n_media} entr"
                    f"{'y' if n_media == 1 else 'ies'} in `{MEDIA_KEYS[m]}`",
                )
            )
    return out


def _forbidden(text: str) -> str | None:
    m = SIGNAL_RE.search(text)
    if m:
        return m.group(0)
    return next((t for t in TOOL_TOKENS if t in text), None)


def _token_problems(messages: list[dict]) -> list[Problem]:
    out = []
    for i, m in enumerate(messages):
        fields = [("content", m["content"])]
        if "thought" in m:
            fields.append(("thought", m["thought"]))
        for j, c in enumerate(m.get("tool_calls") or []):
            fields.append((f"tool_calls[{j}]", json.dumps(c["function"], ensure_ascii=False)))
        for name, text in fields:
            tok = _forbidden(text)
            if tok:
                out.append(
                    Problem(
                        "forbidden_token",
                        f"messages[{i}].{name}: raw special token {tok} in text (signal spans come from "
                        "`generate`, tool tokens from `tool_calls` / tool messages)",
                    )
                )
    return out


def _supervision_problems(record: dict, require_supervised: bool) -> list[Problem]:
    if not require_supervised:
        return []
    trained = [m for m in record["messages"] if m["role"] == "assistant" and m.get("train", True)]
    if trained or "eval" in record:
        return []
    return [
        Problem(
            "no_supervised_turn",
            "no assistant turn to train on (every assistant message has train: false or there is none); "
            "evaluation-only records must carry `eval`",
        )
    ]


def check_record(record: Any, *, require_supervised: bool = True) -> list[Problem]:
    """All problems of one record, each with its skip-count reason.

    ``require_supervised=False`` accepts a conversation with nothing to train on (an inference prompt).
    """
    problems = _schema_problems(record)
    if problems:  # the semantic checks below assume the schema holds
        return problems
    msgs = record["messages"]
    problems = _role_problems(msgs) + _field_problems(msgs)
    problems += _placeholder_problems(record) + _token_problems(msgs)
    return problems + _supervision_problems(record, require_supervised)


def validate_record(record: Any, *, where: str = "<record>") -> list[str]:
    """Every problem of ``record`` as ``"{where}: record 'id': problem"`` strings (empty = valid)."""
    rid = record.get("id") if isinstance(record, dict) else None
    label = f"record {rid!r}" if rid else "record without id"
    return [f"{where}: {label}: {p.message}" for p in check_record(record)]


def ensure_valid(record: Any, *, where: str = "<record>") -> dict:
    """Return ``record`` or raise a RecordError naming it."""
    problems = check_record(record)
    if problems:
        raise RecordError(where, record.get("id") if isinstance(record, dict) else None, problems)
    return record


class JsonlRecords:
    """Iterate the valid records of a JSONL file; ``skipped`` counts bad ones per reason (``on_error='skip'``)."""

    def __init__(
        self, path: str | Path, on_error: Literal["raise", "skip"] = "raise", unique_ids: bool = True
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = Path(path)
        self.on_error = on_error
        self.unique_ids = unique_ids
        self.read = 0
        self.skipped: Counter[str] = Counter()

    def _bad(self, err: RecordError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped[err.reason] += 1
        log.debug("skipping %s", err)

    def __iter__(self) -> Iterator[dict]:
        seen: set[str] = set()
        for lineno, line in iter_text_lines(self.path):
            where = f"{self.path}:{lineno}"
            if isinstance(line, NotUtf8):
                self._bad(RecordError(where, None, [Problem("not_utf8", str(line)[len(where) + 2 :])]))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad(RecordError(where, None, [Problem("json", f"not valid JSON: {e.msg}")]))
                continue
            problems = check_record(record)
            rid = record.get("id") if isinstance(record, dict) else None
            if not problems and self.unique_ids:
                if rid in seen:
                    problems = [Problem("duplicate_id", "id already used earlier in this file")]
                seen.add(rid)
            if problems:
                self._bad(RecordError(where, rid, problems))
                continue
            self.read += 1
            yield record
        if self.skipped:
            log.warning("%s: %d records read, skipped %s", self.path, self.read, dict(self.skipped))


def load_jsonl(
    path: str | Path, on_error: Literal["raise", "skip"] = "raise", unique_ids: bool = True
) -> JsonlRecords:
    """Valid records of a JSONL file (an iterable; ``.skipped`` holds per-reason counts after iterating)."""
    return JsonlRecords(path, on_error=on_error, unique_ids=unique_ids)
