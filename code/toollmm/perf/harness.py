"""Run every figure in its own subprocess and assemble ``bench.json`` + ``bench.md``.

``run(out_dir, sizes)``: a setup process builds the workspace (``toollmm.perf.world``), then each figure
runs as ``python code/bench.py figure NAME`` and writes its JSON; its peak RSS comes from ``wait4``
(the child and the descendants it waited for, e.g. DataLoader workers). Our trainer and the HF Trainer
alternate ``sizes.repeats`` times so a change of machine load hits both. Every figure is checked
(present, finite, positive); a failed check or figure makes the run exit non-zero.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from toollmm.core.paths import REPO_ROOT
from toollmm.perf import report

log = logging.getLogger(__name__)

#: the order of the per-modality figures in reports (a display order, not the model's MODALITIES)
FIGURE_ORDER = ("image", "audio", "video")


def figure_names(sizes) -> list[str]:
    names = ["tokens", "mfu", "mfu_stage1", "mfu_stage2"]
    for _ in range(sizes.repeats):
        names += ["ours", "hf"]
    return names + [f"cache_{m}" for m in FIGURE_ORDER] + ["loader", "inference", "serve"]


def run_figure(name: str, work: Path, sizes_name: str, out_dir: Path, env: dict) -> tuple[dict, float]:
    """One figure in a fresh process; returns (its JSON, peak RSS in MB)."""
    out = out_dir / "figures" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    logf = out_dir / "figures" / f"{name}.log"
    cmd = [sys.executable, str(REPO_ROOT / "code" / "bench.py"), "figure", name.split("#")[0]]
    cmd += ["--work", str(work), "--sizes", sizes_name, "--out", str(out)]
    t0 = time.perf_counter()
    with open(logf, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        tail = logf.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"figure {name} failed (exit {proc.returncode}); log {logf}:\n{tail}")
    data = json.loads(out.read_text())
    data["wall_s"] = wall
    log.info("figure %s: %.1f s, peak RSS %.0f MB", name, wall, usage.ru_maxrss / 1024)
    return data, usage.ru_maxrss / 1024  # Linux reports KiB


def machine(threads: int) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    on_gpu = torch.cuda.is_available()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "gpus": torch.cuda.device_count() if on_gpu else 0,
        "load_avg_before": list(os.getloadavg()),
    }


def assemble(figs: dict[str, list[dict]], rss: dict[str, float], mach: dict, sizes, quick: bool) -> dict:
    mfu = figs["mfu"][0]
    ours = statistics.median(f["real_tokens_per_s"] for f in figs["ours"])
    hf = statistics.median(f["real_tokens_per_s"] for f in figs["hf"])
    # ours and HF ran alternately: each adjacent pair saw similar machine load; the median pair decides
    pairs = [o["real_tokens_per_s"] / h["real_tokens_per_s"] for o, h in zip(figs["ours"], figs["hf"])]
    tokens, loader, inf = figs["tokens"][0], figs["loader"][0], figs["inference"][0]
    bench = {
        "machine": mach,
        "quick": quick,
        "sizes": {
            "name": sizes.name,
            "llm": vars(sizes.llm),
            "micro_batch": sizes.micro_batch,
            "max_length": sizes.max_length,
            "stage1_micro_batch": sizes.stage1_micro_batch,
        },
        "gemm_gflops": mfu["gemm_gflops"],
        report.mfu_key({"machine": mach}): mfu["mfu"],
        **{report.mfu_key({"machine": mach}) + f"_stage{n}": figs[f"mfu_stage{n}"][0]["mfu"] for n in (1, 2)},
        "stage_steps": {f"stage{n}": _stage_step(figs[f"mfu_stage{n}"][0]) for n in (1, 2)},
        "train_real_tokens_per_s": ours,
        "hf_trainer_real_tokens_per_s": hf,
        "vs_hf_trainer_tokens_per_s_ratio": statistics.median(pairs),
        "vs_hf_trainer_pair_ratios": [round(r, 3) for r in pairs],
        "real_token_fraction": tokens["ours"],
        "real_token_fraction_naive": tokens["naive"],
        "feature_cache": {
            m: {k: figs[f"cache_{m}"][0][k] for k in ("speedup", "ideal_speedup", "efficiency")}
            for m in FIGURE_ORDER
        },
        "loader_to_train_ratio": loader["loader_samples_per_s"] / loader["train_samples_per_s"],
        "inference_second_request_speedup": inf["speedup"],
        "serve_concurrent_speedup": figs["serve"][0]["speedup"],
        "serve": {k: v for k, v in figs["serve"][0].items() if k != "wall_s"},
        "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "details": {k: v if len(v) > 1 else v[0] for k, v in figs.items()},
    }
    return bench


def _stage_step(fig: dict) -> dict:
    """What bench.json keeps of a stage-1/2 MFU figure beside its MFU (the rest is in ``details``)."""
    keep = (
        "step_s",
        "tokens_per_s",
        "time_split",
        "output_proj_flop_share",
        "output_proj_forward_time_share",
    )
    return {k: fig[k] for k in keep if k in fig}


def run(out_dir: Path, sizes, work: Path, threads: int) -> tuple[dict, list[str]]:
    """Every figure in its own process -> ``out_dir/bench.{json,md}``. Returns (bench, problems): the
    figures that are missing, not finite or not positive (the caller reports them and fails)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from toollmm.core.paths import ensure_torch_extensions_dir

    ensure_torch_extensions_dir()  # DeepSpeed's JIT ops: built once, reused by every figure
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOOLLMM_NO_TQDM="1")
    # OpenMP threads that sleep (not spin) at barriers: on a shared machine a spinning thread whose partner
    # was descheduled made element-wise ops ~20x slower (measured; docs/benchmarks.md). Both trainers get it.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    mach = machine(threads)
    mach["omp_wait_policy"] = env["OMP_WAIT_POLICY"]
    if sizes.name == "vicuna7b" and mach["device"] == "cpu":
        raise SystemExit("bench: --sizes vicuna7b needs a GPU host (a 7B step on this CPU takes hours)")
    t0 = time.perf_counter()
    run_figure("setup", work, sizes.name, out_dir, env)
    figs: dict[str, list[dict]] = {}
    rss: dict[str, float] = {}
    for name in figure_names(sizes):
        data, mb = run_figure(name, work, sizes.name, out_dir, env)
        figs.setdefault(name, []).append(data)
        rss[name] = max(rss.get(name, 0.0), mb)
    mach["load_avg_after"] = list(os.getloadavg())
    bench = assemble(figs, rss, mach, sizes, sizes.name == "quick")
    bench["wall_s"] = time.perf_counter() - t0
    bench["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    (out_dir / "bench.json").write_text(json.dumps(bench, indent=1, default=str) + "\n")
    problems = report.check(bench)
    (out_dir / "bench.md").write_text(report.markdown(bench))
    return bench, problems
