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

from toollmm.core.errors import UserError
from toollmm.core.tokens import PLACEHOLDER_RE
from toollmm.data.convert import REGISTRY, ConversionError, ConvertStats, iter_source
from toollmm.data.convert.base import Context
from toollmm.data.convert.runner import convert_records

log = logging.getLogger(__name__)


class EvalError(UserError, ValueError):
    """Bad evaluation input; the message names the file, record and key."""


class MissingError(EvalError):
    """References without a prediction (not run, or absent from the predictions file) while
    ``allow_missing`` is off: no metric is computed over them. ``missing`` lists ``(id, reason)``."""

    def __init__(self, message: str, missing: list[tuple[str, str]]):
        super().__init__(message)
        self.missing = missing


def missing_summary(missing: list[tuple[str, str]], total: int) -> dict:
    """``{"count", "of", "reasons": {kind: n}, "requests": [{"id", "reason"}]}`` of references that got no
    prediction; a reason's kind is its text before the first ``": "`` after any ``request X: `` prefix."""
    reasons: dict[str, int] = {}
    for _, why in missing:
        reasons[reason_kind(why)] = reasons.get(reason_kind(why), 0) + 1
    return {
        "count": len(missing),
        "of": total,
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "requests": [{"id": i, "reason": why} for i, why in missing],
    }


def reason_kind(why: str) -> str:
    """``"request X: /data/a.mp4: file not found"`` -> ``"file not found"`` (the part to count by)."""
    text = why.split(": ", 1)[1] if why.startswith("request ") and ": " in why else why
    head, sep, rest = text.partition(": ")
    if sep and any(c in head for c in "/\\") and rest:  # "<path>: reason"
        text = rest
    return text.strip()[:120] or "unknown"


def missing_error(what: str, missing: list[tuple[str, str]], total: int, hint: str) -> MissingError:
    """The error for ``missing`` references: the count, the reasons, the first ids, and what to do."""
    summary = missing_summary(missing, total)
    reasons = "; ".join(f"{n} x {kind}" for kind, n in summary["reasons"].items())
    shown = "\n".join(f"  {i}: {why}" for i, why in missing[:20])
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    return MissingError(
        f"{len(missing)} of {total} reference(s) {what} ({reasons}); no metric was computed:\n{shown}{more}\n"
        f"{hint}; or pass --allow-missing to score the others and exclude these from every denominator",
        missing,
    )


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
    counting them as failures. ``strict``: GPT4Tools image-path arguments must match exactly (the paper).
    ``allow_missing``: ``score_files`` / ``run_benchmark`` score the references that have a prediction
    and exclude the others from every denominator (reported as ``missing``); without it (or ``compat``)
    a reference without a prediction is an error (:class:`MissingError`), never a silent number.
    ``score_predictions`` called directly counts a ``None`` prediction as a failure unless skipping."""

    compat: bool = False
    strict: bool = False
    allow_missing: bool = False

    @property
    def skip_missing(self) -> bool:
        return self.compat or self.allow_missing


def scored_pairs(
    refs: list[Reference], preds: list[dict | None], opts: ScoreOptions
) -> tuple[list[tuple[Reference, dict | None]], int]:
    """The (reference, prediction) pairs a scorer scores, and how many references had no prediction:
    with ``opts.skip_missing`` those are left out of every denominator, otherwise they stay (as ``None``,
    which each scorer counts as a failure)."""
    pairs = [(r, p) for r, p in zip(refs, preds) if p is not None or not opts.skip_missing]
    return pairs, sum(p is None for _, p in zip(refs, preds))


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


def load_references(
    fmt: str, paths: list[str | Path], options: dict[str, str] | None = None
) -> list[Reference]:
    """Convert each reference file with the ``fmt`` converter (with ``options``; our unified JSONL is
    passed through)."""
    refs: list[Reference] = []
    for k, p in enumerate(paths):
        path = Path(p)
        if not path.is_file():
            raise EvalError(f"references file not found: {path}")
        use = "unified" if _is_unified(path) else fmt
        opts = dict(options or {}) if use == fmt else {}
        ctx = Context(path=path, fmt=use, source=f"{fmt}/{path.stem}", options=opts)
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


def read_predictions(
    path: str | Path, check: Callable[[str, dict], None] | None = None
) -> list[tuple[str, dict]]:
    """``[(where, prediction object)]`` of a JSON array or JSONL file (each passed to ``check``)."""
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
            if check is not None:
                check(where, raw)
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
    check: Callable[[str, dict], None] | None = None,
) -> Matched:
    """One predictions file for all references, or one per references file (paired in order); every
    prediction object goes through ``check`` first."""
    n_ref_files = len({r.file_index for r in refs})
    if len(prediction_files) == 1:
        return match_predictions(refs, read_predictions(prediction_files[0], check), ref_keys, pred_keys)
    if len(prediction_files) != n_ref_files:
        raise EvalError(
            f"{len(prediction_files)} predictions files for {n_ref_files} references files:"
            " give one predictions file, or one per references file"
        )
    out: list[dict | None] = [None] * len(refs)
    unmatched: list[str] = []
    for k, pf in enumerate(prediction_files):
        pos = [i for i, r in enumerate(refs) if r.file_index == k]
        m = match_predictions([refs[i] for i in pos], read_predictions(pf, check), ref_keys, pred_keys)
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
    #: prediction keys that carry the answer (at least one must be present) and keys that tie it to a
    #: reference; any other key is ignored, a prediction with no answer key is an error
    answer_keys: tuple[str, ...] = ("text", "tool_calls")
    id_keys: tuple[str, ...] = ("id",)
    #: converter options for reading the references (``--opt`` of prepare_data.py convert)
    ref_options: tuple[tuple[str, str], ...] = ()

    def check_prediction(self, where: str, raw: dict) -> None:
        """A prediction must carry its answer under a key this benchmark reads (never scored 0 silently)."""
        if not any(k in raw for k in self.answer_keys):
            found = ", ".join(map(repr, raw)) or "none"
            raise EvalError(
                f"{where}: no answer key this {self.name} scorer reads (keys found: {found}; answer keys"
                f" accepted: {', '.join(self.answer_keys)}; id keys: {', '.join(self.id_keys)})"
            )


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    BENCHMARKS[spec.name] = spec
    return spec
