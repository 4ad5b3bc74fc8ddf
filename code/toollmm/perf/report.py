"""bench.json -> the checks CI runs and the README table (bench.md)."""

from __future__ import annotations

import math
from pathlib import Path

#: figure -> (target, direction); "at least" unless stated
TARGETS = {
    "mfu": 0.75,
    "vs_hf_trainer_tokens_per_s_ratio": 1.5,  # against HF's best documented configuration (issue 20)
    "real_token_fraction": 0.95,
    "feature_cache_efficiency": 0.9,
    "loader_to_train_ratio": 2.0,
    "inference_second_request_speedup": 5.0,
    "serve_concurrent_speedup": 3.0,
}
#: the order of the per-modality figures in reports (a display order, not the model's MODALITIES)
FIGURE_ORDER = ("image", "audio", "video")


def mfu_key(bench: dict) -> str:
    return "mfu_gpu" if bench.get("machine", {}).get("device", "cpu") != "cpu" else "mfu_cpu"


def required(bench: dict) -> list[str]:
    """Dotted names of every figure bench.json must hold."""
    names = [
        "gemm_gflops",
        mfu_key(bench),
        mfu_key(bench) + "_stage1",
        mfu_key(bench) + "_stage2",
        "train_real_tokens_per_s",
        "hf_trainer_real_tokens_per_s",
        "vs_hf_trainer_tokens_per_s_ratio",
        "real_token_fraction",
        "real_token_fraction_naive",
        "loader_to_train_ratio",
        "inference_second_request_speedup",
        "serve_concurrent_speedup",
        "serve.concurrent_rps",
        "serve.sequential_rps",
        "serve.concurrent_p50_s",
        "serve.concurrent_p95_s",
        "serve.sequential_p50_s",
        "serve.sequential_p95_s",
    ]
    for m in FIGURE_ORDER:
        names += [f"feature_cache.{m}.{k}" for k in ("speedup", "ideal_speedup", "efficiency")]
    return names


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def check(bench: dict) -> list[str]:
    """Problems: a figure missing, not a number, not finite or not positive; a figure without peak RSS."""
    problems = []
    for name in required(bench):
        v = _get(bench, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            problems.append(f"{name}: missing or not a number ({v!r})")
        elif not math.isfinite(v) or v <= 0:
            problems.append(f"{name}: {v} is not finite and positive")
    for fig, mb in (bench.get("peak_rss_mb") or {}).items():
        if not isinstance(mb, (int, float)) or mb <= 0:
            problems.append(f"peak_rss_mb.{fig}: {mb!r}")
    if not bench.get("peak_rss_mb"):
        problems.append("peak_rss_mb: missing")
    errors = _get(bench, "serve.errors")
    if errors != 0:
        problems.append(f"serve.errors: {errors!r} failed requests (must be 0)")
    return problems


def _row(name: str, value, target, note: str = "") -> str:
    if target is None:
        met = ""
    else:
        met = "yes" if value >= target else "**no**"
    tgt = "" if target is None else f">= {target:g}"
    return f"| {name} | {_fmt(value)} | {tgt} | {met} | {note} |"


def _serve_row(bench: dict) -> str:
    s = bench["serve"]
    note = (
        f"{s['concurrent_rps']:.3g} vs {s['sequential_rps']:.3g} req/s; p50 / p95 latency "
        f"{s['concurrent_p50_s']:.3g} / {s['concurrent_p95_s']:.3g} s vs {s['sequential_p50_s']:.3g} / "
        f"{s['sequential_p95_s']:.3g} s; {s['errors']} errors; {Path(s.get('checkpoint', '?')).name}"
    )
    return _row(
        "serve.py: 8 concurrent clients / one at a time (req/s)",
        bench["serve_concurrent_speedup"],
        TARGETS["serve_concurrent_speedup"],
        note,
    )


#: what each stage's MFU row trains (docs/benchmarks.md)
STAGE_TRAINS = {1: "input projection on captions (cached features)", 2: "output projections + signal rows"}


def _stage_rows(bench: dict, mk: str) -> list[str]:
    """The stage-1 and stage-2 MFU rows (reported figures, no target): the step's time split in the notes."""
    rows = []
    for n, what in STAGE_TRAINS.items():
        key = f"{mk}_stage{n}"
        if key not in bench:
            continue
        step = (bench.get("stage_steps") or {}).get(f"stage{n}", {})
        split = step.get("time_split") or {}
        note = f"stage-{n} step: {what}"
        if split:
            parts = ("forward_s", "backward_s", "grad_reduce_s", "optimizer_s")
            note += "; fwd / bwd / reduce / optimiser " + " / ".join(f"{split.get(k, 0):.3g}" for k in parts)
            note += " s"
        if "output_proj_forward_time_share" in step:
            share = step.get("output_proj_flop_share")
            flop = f"{100 * share:.1f} % of FLOPs, " if share is not None else ""
            note += f"; output projections {flop}{100 * step['output_proj_forward_time_share']:.0f} % of forward time"
        rows.append(_row(f"MFU stage {n} ({'CPU' if mk == 'mfu_cpu' else 'GPU'})", bench[key], None, note))
    return rows


def _llm_size(bench: dict) -> str:
    """The benchmarked LLM's shape in a few words (the quick sizes are not the ~100M model)."""
    llm = (bench.get("sizes") or {}).get("llm") or {}
    if not llm:
        return "~100M"
    return f"hidden {llm.get('hidden')} x {llm.get('layers')} layers"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _hf_note(bench: dict) -> str:
    """Which HF configuration was the best in each run (``toollmm.perf.hf_baseline.HF_CONFIGS``)."""
    runs = bench.get("details", {}).get("hf") or []
    runs = runs if isinstance(runs, list) else [runs]
    best = [r.get("config") for r in runs if isinstance(r, dict) and r.get("config")]
    if not best:
        return "HF's best documented configuration"
    return (
        "best HF configuration per run: "
        + ", ".join(best)
        + " (grouped = padded + group_by_length; flattened = padding-free)"
    )


def markdown(bench: dict) -> str:
    """The README table: every figure, its target, whether it is met, and the machine it ran on."""
    m = bench["machine"]
    mk = mfu_key(bench)
    load = ", ".join(f"{x:.2f}" for x in m.get("load_avg_before", []))
    lines = [
        f"Machine: {m.get('cpu', '?')}, {m.get('threads')} threads, {m.get('device', 'cpu')}; "
        f"torch {m.get('torch', '?')}; load average before the run {load or '?'}; "
        f"{'quick (shrunk models)' if bench.get('quick') else 'full size'}; {bench.get('date', '')}.",
        "",
        "| figure | value | target | met | notes |",
        "|---|---|---|---|---|",
        _row(
            "GEMM fp32 GFLOP/s" if mk == "mfu_cpu" else "GEMM bf16 GFLOP/s",
            bench["gemm_gflops"],
            None,
            "median of the bursts around the MFU steps",
        ),
        _row(
            f"MFU ({'CPU' if mk == 'mfu_cpu' else 'GPU'})",
            bench[mk],
            TARGETS["mfu"],
            f"stage-3 step, {_llm_size(bench)} Llama; FLOPs: docs/benchmarks.md",
        ),
        *_stage_rows(bench, mk),
        _row("our trainer, real tokens/s", bench["train_real_tokens_per_s"], None, "run_stage, stage 3"),
        _row(
            "HF Trainer + peft, real tokens/s",
            bench["hf_trainer_real_tokens_per_s"],
            None,
            _hf_note(bench),
        ),
        _row(
            "ours / HF Trainer (tokens/s)",
            bench["vs_hf_trainer_tokens_per_s_ratio"],
            TARGETS["vs_hf_trainer_tokens_per_s_ratio"],
            "median of alternating pairs "
            + ", ".join(f"{r:.2f}" for r in bench.get("vs_hf_trainer_pair_ratios", [])),
        ),
        _row(
            "real-token fraction, ours",
            bench["real_token_fraction"],
            TARGETS["real_token_fraction"],
            "packing + length grouping",
        ),
        _row("real-token fraction, naive", bench["real_token_fraction_naive"], None, "pad to longest"),
    ]
    for mod in FIGURE_ORDER:
        fc = bench["feature_cache"][mod]
        lines.append(
            _row(
                f"feature cache {mod}: efficiency",
                fc["efficiency"],
                TARGETS["feature_cache_efficiency"],
                f"speedup {fc['speedup']:.3g} of ideal {fc['ideal_speedup']:.3g}",
            )
        )
    lines += [
        _row(
            "data pipeline / trainer (samples/s)",
            bench["loader_to_train_ratio"],
            TARGETS["loader_to_train_ratio"],
            "stage 3, media from the feature cache",
        ),
        _row(
            "inference: cold process / warm 2nd request",
            bench["inference_second_request_speedup"],
            TARGETS["inference_second_request_speedup"],
            "toollmm.load + Runtime.generate",
        ),
        _serve_row(bench),
        "",
        "Peak RSS per figure (MB): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(bench.get("peak_rss_mb", {}).items())),
        "",
    ]
    return "\n".join(lines)
