"""The unified record, owned here: schema, the one validator, the bad-input reasons, media keys, samples.

A record is the JSON object of ``data/schema.json`` (documented with worked examples in data/README.md).
:func:`check_record` is THE validator: the schema plus the checks a schema cannot express (roles, fields,
placeholders, raw special tokens, supervision); every problem carries one of :data:`REASONS`, the one
vocabulary every skip counter uses (stream, ``load_jsonl``, renderer). Callers wrap it:

* :func:`ensure_trainable` raises :class:`BadSample` (``file:line (id=x): reason: detail``) for the stream,
  which validates each record once, when a source loads it (JSONL line or shard member), and either
  re-raises (``data.on_error: raise``) or counts it under ``BadSample.reason`` (``skip``);
* :func:`validate_record` (problem strings) and :func:`ensure_valid` (:class:`RecordError`) for converters,
  the renderer's inference prompts and users; :func:`load_jsonl` streams a JSONL file of records.

Every reader (JSONL + media root, webdataset shards) produces :class:`Sample` objects: the record, where it
is, its media bytes and caption embeddings.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from toollmm.core.errors import NotUtf8, UserError, iter_text_lines
from toollmm.core.paths import DATA_DIR
from toollmm.core.tokens import MODALITIES, PLACEHOLDER_RE, SIGNAL_RE, TOOL_TOKENS

log = logging.getLogger(__name__)

SCHEMA_PATH = DATA_DIR / "schema.json"
#: modality -> the record's media list key (in ``MODALITIES`` order)
MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios"}
ASSISTANT_ONLY = ("tool_calls", "thought", "generate", "train")
TOOL_ONLY = ("name",)

#: why a record or sample cannot be used (the keys of every skip counter)
REASONS = (
    "not_utf8",  # a JSONL line (or shard member) whose bytes are not UTF-8 text
    "malformed_json",  # a JSONL line (or shard member) that is not a JSON object
    "unknown_key",  # a key the record schema does not know (a misspelt key is also reported missing)
    "invalid_record",  # any other schema violation, or a record the pipeline cannot use
    "empty_conversation",  # no messages, or no supervised assistant turn (and no `eval`)
    "roles",  # the order of roles ([system] user assistant (tool* assistant)*)
    "fields",  # a message field on the wrong role
    "media_mismatch",  # placeholders in the text do not match the media lists
    "forbidden_token",  # a raw special token inside record text
    "duplicate_id",  # an id already used earlier in the file (load_jsonl)
    "missing_media",  # a media file (or shard member) that does not exist
    "corrupt_media",  # media that cannot be decoded
    "bad_embedding",  # a caption embedding that is missing from its store or unreadable
    "format",  # the chosen chat/tool format cannot express the record (renderer)
    "overlong",  # more tokens than data.max_length (its own policy: data.overlong)
)


def _known(reason: str) -> str:
    if reason not in REASONS:
        raise ValueError(f"unknown bad-input reason {reason!r}; known: {REASONS}")
    return reason


class BadSample(UserError):
    """A sample that cannot train. ``str()`` names where it is, why, and what was wrong."""

    def __init__(self, reason: str, where: str, detail: str):
        self.reason, self.where, self.detail = _known(reason), where, detail
        super().__init__(f"{where}: {reason}: {detail}")

    def __reduce__(self):  # survive the trip from a DataLoader worker
        return (BadSample, (self.reason, self.where, self.detail))


@dataclass(frozen=True)
class Problem:
    reason: str  # one of REASONS
    message: str

    def __post_init__(self):
        _known(self.reason)


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
        return self.problems[0].reason if self.problems else "invalid_record"


@dataclass
class Media:
    """One input medium: its path in the record (for messages) and its bytes or cached features."""

    name: str
    data: bytes | list[bytes] | None = None  # file bytes; a list of frame bytes for a frame-list video
    features: np.ndarray | None = None  # cached encoder output, when the shard holds it


@dataclass
class Sample:
    record: dict
    where: str  # "file.jsonl:12 (id=abc)" / "shard-000003.tar#000000120 (id=abc)"
    source: str = ""
    media: dict[str, list[Media]] = field(default_factory=dict)  # modality -> in placeholder order
    captions: dict[int, np.ndarray] = field(default_factory=dict)  # generate-target index -> embedding

    @property
    def id(self) -> str:
        return str(self.record.get("id", ""))


def where_of(location: str, record: object) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{location} (id={rid})" if rid is not None else location


def parse_record(text: str | bytes, where: str, offset: int = 0) -> dict:
    """One JSON object; ``offset`` is the byte offset of ``text`` in its file (named for bad bytes)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            at = offset + e.start
            detail = f"not UTF-8 text (byte 0x{text[e.start]:02x} at byte offset {at})"
            raise BadSample("not_utf8", where, detail) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSample("malformed_json", where, f"not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise BadSample("malformed_json", where, f"expected a JSON object, got {type(record).__name__}")
    return record


def generate_targets(record: dict) -> list[dict]:
    """The record's ``generate`` entries in message order (index = caption-embedding slot)."""
    return [g for m in record.get("messages", []) for g in (m.get("generate") or [])]


def load_caption(data: bytes, where: str, name: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for damaged files
        raise BadSample("bad_embedding", where, f"{name}: unreadable .npy ({e})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise BadSample(
            "bad_embedding", where, f"{name}: expected a float [n_query, dim] array, got {arr.shape}"
        )
    return arr


# ------------------------------------------------------------------------------- the validator
def _inline_refs(node, defs: dict):
    """The schema with every ``#/$defs/...`` reference replaced by its target (it is not recursive), so
    validating follows no references: same verdicts and messages, faster."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = _inline_refs(defs[ref.rsplit("/", 1)[-1]], defs)
            rest = {k: _inline_refs(v, defs) for k, v in node.items() if k != "$ref"}
            return {**rest, "allOf": [target]} if rest else target
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(_inline_refs(schema, schema.get("$defs", {})))


def _path(err) -> str:
    out = ""
    for p in err.absolute_path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(record)"


def _keyed_errors(record: Any) -> list[tuple[list[str], str, str]]:
    """(sort key, validator keyword at messages?, message) of every schema error of ``record``."""
    out = []
    for e in _validator().iter_errors(record):
        why = sorted({c.message for c in e.context or []})  # anyOf / oneOf: say what each branch wanted
        text = f"{_path(e)}: {e.message}" + (f" ({'; or '.join(why)})" if why else "")
        kind = "empty" if e.validator == "minItems" and list(e.absolute_path) == ["messages"] else e.validator
        out.append((list(map(str, e.absolute_path)), kind, text))
    return out


@lru_cache(maxsize=256)
def _tools_errors(tools_json: str) -> tuple[tuple[list[str], str, str], ...]:
    """Schema errors of a ``tools`` list: sources repeat one list verbatim on every record, so each
    distinct list is validated once (inside a minimal valid record, so the paths are the record's)."""
    probe = {"id": "x", "source": "x", "messages": [{"role": "user", "content": ""}]}
    return tuple(_keyed_errors({**probe, "tools": json.loads(tools_json)}))


def _schema_problems(record: Any) -> list[Problem]:
    """Schema errors, sorted by path; all carry the record's one schema reason: ``unknown_key`` when a key
    is unknown (a misspelt key is also reported as a missing one), ``empty_conversation`` for no messages,
    else ``invalid_record``."""
    tools = record.get("tools") if isinstance(record, dict) else None
    if isinstance(tools, list) and tools:
        errs = _keyed_errors({**record, "tools": []}) + list(_tools_errors(json.dumps(tools)))
    else:
        errs = _keyed_errors(record)
    errs.sort(key=lambda e: e[0])
    kinds = {k for _, k, _ in errs}
    if "additionalProperties" in kinds:
        reason = "unknown_key"
    elif "empty" in kinds:
        reason = "empty_conversation"
    else:
        reason = "invalid_record"
    return [Problem(reason, text) for _, _, text in errs]


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
                    "media_mismatch",
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
                    "media_mismatch",
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
            "empty_conversation",
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


def ensure_trainable(record: Any, where: str) -> None:
    """The stream's check of a loaded record: raise :class:`BadSample` under the first problem's reason,
    naming ``where`` and (at most three of) the problems."""
    problems = check_record(record)
    if problems:
        text = "; ".join(p.message for p in problems[:3])
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BadSample(problems[0].reason, where, text + more)


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
                self._bad(RecordError(where, None, [Problem("malformed_json", f"not valid JSON: {e.msg}")]))
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
