"""What every benchmark shares: references read through the converters, prediction files, matching
predictions to references, score options, and the benchmark registry.

References are the benchmarks' own files (or our unified JSONL of them), converted in memory by
``toollmm.data.convert`` -- the scorers never parse a source format themselves. Predictions are a JSON
array or JSONL of objects; each benchmark says which keys (ids, query texts) tie a prediction to a
reference. A key that several references share is consumed in file order (MLLM-Tool repeats ids across
modalities; the query text tells them apart).
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from toollmm.data.convert import REGISTRY, ConversionError, ConvertStats, iter_source
from toollmm.data.convert.base import Context
from toollmm.data.convert.runner import convert_records
from toollmm.errors import UserError
from toollmm.tokens import PLACEHOLDER_RE

log = logging.getLogger(__name__)


class EvalError(UserError, ValueError):
    """Bad evaluation input; the message names the file, record and key."""


@dataclass
class Reference:
    """One converted reference record and where it came from."""

    record: dict
    file: str
    index: int  # position in its file
    file_index: int = 0  # which --references file

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def where(self) -> str:
        return f"{self.file}:record {self.index}"


@dataclass(frozen=True)
class ScoreOptions:
    """``compat``: skip references without a prediction (the published GPT4Tools script) instead of
    counting them as failures. ``strict``: GPT4Tools image-path arguments must match exactly (the paper)."""

    compat: bool = False
    strict: bool = False


@dataclass
class Matched:
    """Predictions matched to references (``None`` = no prediction) and what did not match."""

    predictions: list[dict | None]
    unmatched: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(p is None for p in self.predictions)


# --------------------------------------------------------------------------------------- loading
def _is_unified(path: Path) -> bool:
    for _, raw in iter_source(path):
        return isinstance(raw, dict) and isinstance(raw.get("messages"), list)
    return False


def load_references(fmt: str, paths: list[str | Path]) -> list[Reference]:
    """Convert each reference file with the ``fmt`` converter (or pass our unified JSONL through)."""
    refs: list[Reference] = []
    for k, p in enumerate(paths):
        path = Path(p)
        if not path.is_file():
            raise EvalError(f"references file not found: {path}")
        use = "unified" if _is_unified(path) else fmt
        ctx = Context(path=path, fmt=use, source=f"{fmt}/{path.stem}")
        stats = ConvertStats(use, str(path), "")
        try:
            records = list(convert_records(use, path, ctx, "raise", stats))
            if REGISTRY[use].finish is not None:
                records = REGISTRY[use].finish(records, ctx)
        except ConversionError as e:
            raise EvalError(f"references: {e}") from e
        for i, rec in enumerate(records):
            if not isinstance(rec.get("eval"), dict):
                raise EvalError(
                    f"{path}:record {i}: not an evaluation record (no 'eval' reference/acceptable answers)"
                )
            refs.append(Reference(rec, str(path), i, k))
        log.info("%s: %d reference records", path, len(records))
    if not refs:
        raise EvalError(f"no reference records in {', '.join(map(str, paths))}")
    return refs


def read_predictions(path: str | Path) -> list[tuple[str, dict]]:
    """``[(where, prediction object)]`` of a JSON array or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"predictions file not found: {path}")
    out = []
    try:
        for where, raw in iter_source(path):
            if isinstance(raw, Exception):
                raise EvalError(str(raw))
            if not isinstance(raw, dict):
                raise EvalError(f"{where}: a prediction must be a JSON object, got {type(raw).__name__}")
            out.append((where, raw))
    except ConversionError as e:
        raise EvalError(f"predictions: {e}") from e
    return out


# -------------------------------------------------------------------------------------- matching
def user_query(record: dict) -> str:
    """The last user turn without its media placeholders (the query text the anchors key on)."""
    user = [m for m in record["messages"] if m["role"] == "user"]
    text = user[-1]["content"] if user else ""
    return PLACEHOLDER_RE.sub("", text).strip()


def match_predictions(
    refs: list[Reference],
    preds: list[tuple[str, dict]],
    ref_keys: Callable[[Reference], list[str]],
    pred_keys: Callable[[str, dict], list[str]],
) -> Matched:
    """Give each prediction to the first unmatched reference sharing one of its keys (tried in order).

    A key shared by references of different files is refused: the caller must pair prediction and
    reference files instead. Predictions that match nothing are listed in ``unmatched``."""
    index: dict[str, deque[int]] = defaultdict(deque)
    for i, r in enumerate(refs):
        for key in dict.fromkeys(ref_keys(r)):
            index[key].append(i)
    taken: list[dict | None] = [None] * len(refs)
    unmatched: list[str] = []
    for where, raw in preds:
        hit = None
        for key in pred_keys(where, raw):
            queue = index.get(key)
            if not queue:
                continue
            files = {refs[i].file for i in queue}
            if len(files) > 1:
                raise EvalError(
                    f"{where}: key {key[:80]!r} occurs in several reference files ({', '.join(sorted(files))});"
                    " give one --predictions file per --references file"
                )
            while queue and taken[queue[0]] is not None:
                queue.popleft()
            if queue:
                hit = queue.popleft()
                break
        if hit is None:
            unmatched.append(where)
        else:
            taken[hit] = raw
    if unmatched:
        log.warning("%d prediction(s) match no reference (first: %s)", len(unmatched), unmatched[0])
    return Matched(taken, unmatched)


def match_files(
    refs: list[Reference],
    prediction_files: list[str | Path],
    ref_keys: Callable[[Reference], list[str]],
    pred_keys: Callable[[str, dict], list[str]],
) -> Matched:
    """One predictions file for all references, or one per references file (paired in order)."""
    n_ref_files = len({r.file_index for r in refs})
    if len(prediction_files) == 1:
        return match_predictions(refs, read_predictions(prediction_files[0]), ref_keys, pred_keys)
    if len(prediction_files) != n_ref_files:
        raise EvalError(
            f"{len(prediction_files)} predictions files for {n_ref_files} references files:"
            " give one predictions file, or one per references file"
        )
    out: list[dict | None] = [None] * len(refs)
    unmatched: list[str] = []
    for k, pf in enumerate(prediction_files):
        pos = [i for i, r in enumerate(refs) if r.file_index == k]
        m = match_predictions([refs[i] for i in pos], read_predictions(pf), ref_keys, pred_keys)
        for i, p in zip(pos, m.predictions):
            out[i] = p
        unmatched += m.unmatched
    return Matched(out, unmatched)


# -------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: its converter, how predictions find their reference, the scorer and its table."""

    name: str
    fmt: str
    ref_keys: Callable[[Reference], list[str]]
    pred_keys: Callable[[str, dict], list[str]]
    score: Callable[..., dict]  # (refs, predictions, opts, all_refs=None) -> metrics
    rows: Callable[[dict], list[tuple[str, dict]]]
    columns: tuple[str, ...]
    doc: str = ""


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    BENCHMARKS[spec.name] = spec
    return spec
