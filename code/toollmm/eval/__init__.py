"""Tool-use benchmarks, scored exactly as their authors defined them: GPT4Tools, MLLM-Tool, VIoT-Tool.

    score_files("gpt4tools", ["gpt4tools_val_seen.json"], ["preds.json"])   -> results dict
    run_benchmark("viot", ["test_action.json"], generate, out_dir=...)      -> results dict (+ files)

``BENCHMARKS`` maps a name to its :class:`BenchmarkSpec` (converter, matching keys, scorer, table).
``code/evaluate.py`` is the command line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from toollmm.eval import gpt4tools, mllm_tool, viot  # noqa: F401  (register the benchmarks)

from .common import (
    BENCHMARKS,
    BenchmarkSpec,
    EvalError,
    MissingError,
    Reference,
    ScoreOptions,
    load_references,
    match_files,
    missing_error,
    missing_summary,
)
from .metrics import format_table
from .run import MODES, Generator, generate_predictions

__all__ = [
    "BENCHMARKS",
    "MODES",
    "BenchmarkSpec",
    "EvalError",
    "Generator",
    "MissingError",
    "Reference",
    "ScoreOptions",
    "format_results",
    "run_benchmark",
    "score_files",
    "score_predictions",
]

log = logging.getLogger(__name__)


def _spec(benchmark: str) -> BenchmarkSpec:
    if benchmark not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {benchmark!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[benchmark]


def _check(benchmark: str, opts: ScoreOptions) -> None:
    if opts.strict and benchmark != "gpt4tools":
        raise EvalError("--strict (exact image paths) only applies to gpt4tools")


def _header(benchmark: str, references, opts: ScoreOptions, **extra) -> dict:
    return {
        "benchmark": benchmark,
        "references": [str(p) for p in references],
        **extra,
        "options": {"compat": opts.compat, "strict": opts.strict, "allow_missing": opts.allow_missing},
    }


def score_predictions(
    benchmark: str, refs: list[Reference], predictions: list[dict | None], opts: ScoreOptions
) -> dict:
    """Metrics of predictions already matched to ``refs`` (``None`` = no prediction)."""
    _check(benchmark, opts)
    return _spec(benchmark).score(refs, predictions, opts)


def score_files(
    benchmark: str,
    references: list[str | os.PathLike],
    predictions: list[str | os.PathLike],
    opts: ScoreOptions | None = None,
) -> dict:
    """Score prediction file(s) against the benchmark's reference file(s).

    Every prediction must carry its answer under a key the benchmark reads (else :class:`EvalError`).
    References without a prediction raise :class:`MissingError` unless ``opts.allow_missing`` (or
    ``compat``): then they are excluded from the metrics and listed under ``missing``."""
    opts = opts or ScoreOptions()
    _check(benchmark, opts)
    spec = _spec(benchmark)
    refs = load_references(spec.fmt, list(references), dict(spec.ref_options))
    matched = match_files(refs, list(predictions), spec.ref_keys, spec.pred_keys, spec.check_prediction)
    missing = [(r.id, "no prediction") for r, p in zip(refs, matched.predictions) if p is None]
    if missing and not opts.skip_missing:
        raise missing_error(
            "have no prediction",
            missing,
            len(refs),
            "check the predictions' ids (or give one file per references file)",
        )
    metrics = spec.score(refs, matched.predictions, opts)
    head = _header(benchmark, references, opts, predictions=[str(p) for p in predictions])
    return {
        **head,
        "metrics": metrics,
        "missing": missing_summary(missing, len(refs)),
        "unmatched_predictions": len(matched.unmatched),
    }


def run_benchmark(
    benchmark: str,
    references: list[str | os.PathLike],
    generate: Generator,
    out_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    mode: str = "teacher-forced",
    batch_size: int = 8,
    opts: ScoreOptions | None = None,
    media_root: str | os.PathLike | None = None,
) -> dict:
    """Generate for the first ``limit`` references, score, and (with ``out_dir``) write
    ``<benchmark>.json`` and ``<benchmark>.predictions.jsonl`` there. Relative media paths in the
    references are taken from ``media_root`` (default: each references file's folder).

    A request the model could not run (media not found, unrenderable prompt; the prediction carries
    ``not_run``) has no prediction: with ``opts.allow_missing`` it is excluded from the metrics and
    listed under ``not_run``; without, :class:`MissingError` is raised after the predictions (and the
    results, without metrics) are written."""
    opts = opts or ScoreOptions()
    _check(benchmark, opts)
    spec = _spec(benchmark)
    refs = load_references(spec.fmt, list(references), dict(spec.ref_options))
    universe = refs
    if limit is not None:
        refs = refs[:limit]
    preds = generate_predictions(refs, generate, mode=mode, batch_size=batch_size, media_root=media_root)
    not_run = [(r.id, str(p["not_run"])) for r, p in zip(refs, preds) if p.get("not_run")]
    result = {
        **_header(benchmark, references, opts, mode=mode, limit=limit),
        "not_run": missing_summary(not_run, len(refs)),
    }
    failure = None
    if not_run and not opts.skip_missing:
        failure = missing_error(
            "were not run", not_run, len(refs), "fix the inputs (relative media paths: --media-root)"
        )
        result["metrics"] = None
    else:
        scored = [None if p.get("not_run") else p for p in preds]  # preds are in reference order
        result["metrics"] = spec.score(refs, scored, opts, all_refs=universe)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write(
            out / f"{benchmark}.predictions.jsonl",
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds),
        )
        _write(out / f"{benchmark}.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        result["written"] = [str(out / f"{benchmark}.json"), str(out / f"{benchmark}.predictions.jsonl")]
    if failure is not None:
        raise failure
    return result


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_results(result: dict) -> str:
    """The results as a table (one row per split / slice / tool), then what was not scored and why."""
    spec = _spec(result["benchmark"])
    m = result["metrics"]
    notes = []
    for key, what in (("not_run", "request(s) not run"), ("missing", "reference(s) without a prediction")):
        info = result.get(key) or {}
        if info.get("count"):
            reasons = "; ".join(f"{n} x {kind}" for kind, n in info["reasons"].items())
            notes.append(f"{info['count']} of {info['of']} {what}, excluded from every metric ({reasons})")
    if m.get("missing") and not any((result.get(k) or {}).get("count") for k in ("not_run", "missing")):
        verb = "skipped (--compat)" if result["options"]["compat"] else "scored as failures"
        notes.append(f"{m['missing']} reference(s) without a prediction, {verb}")
    if result.get("unmatched_predictions"):
        notes.append(f"{result['unmatched_predictions']} prediction(s) matched no reference")
    table = format_table(spec.rows(m), spec.columns, title=f"{spec.name}: {spec.doc}")
    return "\n".join([table, *notes])
