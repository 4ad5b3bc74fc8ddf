"""Inference figure: a process that loads everything for one request vs the second request of a warm one.

Both go through ``toollmm.load(stage folder).generate([Request])`` (renderer prompt, media preprocessing
and the frozen encoder, the decode engine over the step model) with the same request: a held-out demo
instruction with an image, greedy, ``max_new_tokens`` fixed. The cold time is the wall time of a fresh
``python code/bench.py infer-once`` process (interpreter start, imports, loading, generation, exit).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from toollmm.core.paths import REPO_ROOT
from toollmm.perf.world import World

TRAINABLE = ["lora", "input_proj", "token_rows.signal", "token_rows.tool"]


def prepare(world: World) -> tuple[Path, Path]:
    """A stage folder of the bench model (untrained delta: timing does not depend on the values) and the
    request file."""
    from toollmm.checkpoint.stage import save_stage
    from toollmm.model.toollmm_model import build_model

    stage_dir = world.work / f"infer_stage_{world.sizes.name}"
    request = world.work / "infer_request.json"
    if not (stage_dir / "manifest.json").is_file():
        cfg = world.config(
            "infer",
            3,
            train={"trainable": TRAINABLE},
            data={"train": [world.source("train", "tools")]},
            model={"decoders": {m: {"path": None} for m in ("image", "video", "audio")}},
        ).config
        model = build_model(cfg.model)
        model.trainable_parameters(TRAINABLE)
        save_stage(model, cfg, stage_dir)
    with open(world.demo / "heldout" / "instruct.jsonl", encoding="utf-8") as f:
        rec = next(r for r in map(json.loads, f) if r.get("images"))
    req = {
        "messages": rec["messages"][:1],
        "images": [str(world.demo / p) for p in rec["images"]],
        "id": rec["id"],
    }
    request.write_text(json.dumps(req))
    return stage_dir, request


def _overrides(new_tokens: int) -> list[str]:
    return [f"inference.max_new_tokens={new_tokens}", "inference.temperature=0.0"]


def infer_once(stage_dir: str, request: str, new_tokens: int) -> dict:
    """Load and answer one request (the body of the cold process)."""
    import toollmm
    from toollmm.infer.requests import Request

    t0 = time.perf_counter()
    rt = toollmm.load(stage_dir, overrides=_overrides(new_tokens))
    t1 = time.perf_counter()
    res = rt.generate([Request(**json.loads(Path(request).read_text()))])[0]
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "generate_s": t2 - t1, "tokens": len(res.token_ids)}


def _cold(stage_dir: Path, request: Path, n: int, threads: int | None = None) -> tuple[float, dict]:
    """Wall time of a fresh process answering the request (and what it reports about itself)."""
    cmd = [sys.executable, str(REPO_ROOT / "code" / "bench.py"), "infer-once"]
    cmd += ["--stage", str(stage_dir), "--request", str(request), "--new-tokens", str(n)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"cold inference process failed:\n{out.stderr[-3000:]}")
    return wall, json.loads(out.stdout.strip().splitlines()[-1])


def _second(rt, req) -> float:
    rt.generate([req])
    t0 = time.perf_counter()
    rt.generate([req])
    return time.perf_counter() - t0


def inference(world: World) -> dict:
    """The figure at the harness's thread count, and (details) the same with one thread, the usual
    setting for a CPU serving process: token-by-token decoding is many tiny ops, where waking a second
    OpenMP thread per op costs more than it saves."""
    import torch

    import toollmm
    from toollmm.infer.requests import Request

    n = world.sizes.new_tokens
    stage_dir, request = prepare(world)
    colds = [_cold(stage_dir, request, n) for _ in range(world.sizes.repeats)]
    req = Request(**json.loads(request.read_text()))
    t0 = time.perf_counter()
    rt = toollmm.load(stage_dir, overrides=_overrides(n))
    load_s = time.perf_counter() - t0
    warm = _second(rt, req)
    threads = torch.get_num_threads()
    cold = statistics.median(w for w, _ in colds)
    out = {
        "speedup": cold / warm,
        "cold_s": cold,
        "warm_second_s": warm,
        "warm_load_s": load_s,
        "threads": threads,
        "cold_inner": [inner for _, inner in colds],
    }
    if threads > 1 and world.sizes.name != "quick":  # one more cold process: not worth it in CI
        torch.set_num_threads(1)
        warm1 = _second(rt, req)
        cold1, _ = _cold(stage_dir, request, n, threads=1)
        out.update(one_thread={"speedup": cold1 / warm1, "cold_s": cold1, "warm_second_s": warm1})
    return out
