"""One loaded training sample (a unified record + its media bytes) and the bad-input vocabulary.

Every reader (JSONL + media root, webdataset shards) produces :class:`Sample` objects and raises
:class:`BadSample` for input that cannot train, always naming the file and the record. The stream either
re-raises it (``data.on_error: raise``) or counts it under ``BadSample.reason`` (``skip``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from toollmm.errors import UserError

from ..paths import resolve
from ..tokens import PLACEHOLDER

#: why a sample could not train (the keys of the skip counters)
REASONS = (
    "malformed_json",  # a JSONL line (or shard member) that is not a JSON object
    "not_utf8",  # a JSONL line (or shard member) whose bytes are not UTF-8 text
    "unknown_key",  # a key the record schema does not know
    "invalid_record",  # any other schema violation
    "empty_conversation",  # no messages, or no supervised assistant turn
    "media_mismatch",  # placeholders in the text do not match the media lists
    "missing_media",  # a media file (or shard member) that does not exist
    "corrupt_media",  # media that cannot be decoded
    "bad_embedding",  # a caption embedding that is missing from its store or unreadable
    "overlong",  # more tokens than data.max_length (its own policy: data.overlong)
)
MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios"}


class BadSample(UserError):
    """A sample that cannot train. ``str()`` names where it is, why, and what was wrong."""

    def __init__(self, reason: str, where: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; known: {REASONS}")
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(f"{where}: {reason}: {detail}")

    def __reduce__(self):  # survive the trip from a DataLoader worker
        return (BadSample, (self.reason, self.where, self.detail))


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


@lru_cache(maxsize=1)
def _validator():
    """The record schema's validator. Data A's ``toollmm.data.schema`` owns the schema file; this reads
    the same ``data/schema.json`` directly so the stream does not depend on its Python API."""
    import jsonschema

    with open(resolve("data/schema.json"), encoding="utf-8") as f:
        schema = json.load(f)
    return jsonschema.Draft202012Validator(schema)


def _reason(errors) -> str:
    """Classify schema errors; a misspelt key (also reported as a missing one) counts as unknown."""
    if any(e.validator == "additionalProperties" for e in errors):
        return "unknown_key"
    if any(e.validator == "minItems" and list(e.absolute_path) == ["messages"] for e in errors):
        return "empty_conversation"
    return "invalid_record"


def generate_targets(record: dict) -> list[dict]:
    """The record's ``generate`` entries in message order (index = caption-embedding slot)."""
    return [g for m in record.get("messages", []) for g in (m.get("generate") or [])]


#: Data A's semantic-check reasons (toollmm.data.schema) -> ours
_CHECK_REASONS = {
    "placeholders": "media_mismatch",
    "no_supervised_turn": "empty_conversation",
    "json": "malformed_json",
}


def _semantic_check():
    try:
        # Data A: roles, fields, placeholders, raw special tokens, supervision
        from .schema import check_record
    except ImportError:
        return None
    return check_record


def validate_record(record: dict, where: str) -> None:
    """Data A's checks (``toollmm.data.schema.check_record``: schema, roles, fields, placeholders, raw
    special tokens, supervision) or, without them, the schema plus placeholder counts and supervision.
    Schema errors are classified as unknown key / empty conversation / other."""
    check = _semantic_check()
    if check is not None:
        problems = check(record)
        if not problems:
            return
        if problems[0].reason != "schema":
            reason = _CHECK_REASONS.get(problems[0].reason, "invalid_record")
            raise BadSample(reason, where, "; ".join(p.message for p in problems))
    errors = sorted(_validator().iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        text = "; ".join(
            f"at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:3]
        )
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        raise BadSample(_reason(errors), where, text + more)
    for modality, key in MEDIA_KEYS.items():
        n_text = sum(m["content"].count(PLACEHOLDER[modality]) for m in record["messages"])
        n_media = len(record.get(key, []))
        if n_text != n_media:
            raise BadSample(
                "media_mismatch",
                where,
                f"{n_text} {PLACEHOLDER[modality]} placeholder(s) but {n_media} {key}",
            )
    if not any(m["role"] == "assistant" and m.get("train", True) for m in record["messages"]):
        raise BadSample("empty_conversation", where, "no assistant turn to train on")


def load_caption(data: bytes, where: str, name: str) -> np.ndarray:
    import io

    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for damaged files
        raise BadSample("bad_embedding", where, f"{name}: unreadable .npy ({e})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise BadSample(
            "bad_embedding", where, f"{name}: expected a float [n_query, dim] array, got {arr.shape}"
        )
    return arr
