"""Paired A/B of the training step's levers (issue 20): ``python code/bench.py levers``.

One process builds the bench world's stage-3 MFU run (``train_figs.stage3_tools``: config/stage_3.yaml's
trainable set, dsconfig/stage_3.json, packed tool-use rows) and its DeepSpeed engine once, then times
``train_step`` on the same batches with each variant in turn, variant after variant on every batch, so
that a change of machine load hits all of them alike. Reported per variant: the median model GFLOP/s of its
steps and the median of its per-batch ratios against the first variant.

Variants: ``unfused`` (transformers' + peft's own forward), ``fused`` (``model.llm.fused_projections``,
the default: per-module base GEMMs on a CPU), ``fused_concat`` (q/k/v and gate/up as one GEMM each, the CUDA
setting, forced on the CPU), ``shared`` (fused + ``model.llm.lora.shared_dropout``).
"""

from __future__ import annotations

import statistics
import time

from toollmm.model import fused
from toollmm.perf.train_figs import batch_flops, cycle_batches, stage3_tools
from toollmm.perf.train_step import train_step
from toollmm.perf.world import World

VARIANTS = ("unfused", "fused", "fused_concat", "shared")


def _set(model, variant: str) -> None:
    fused.unfuse(model)
    fused.CONCAT["cpu"] = variant == "fused_concat"
    if variant != "unfused":
        fused.fuse_llama_layers(model, shared_dropout=variant == "shared")


def paired_levers(world: World, variants: list[str], rounds: int, batches: int = 6) -> dict:
    from toollmm.train.build import build_run
    from toollmm.train.ds import init_distributed
    from toollmm.train.loop import make_engine

    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown lever variant(s) {bad}; one of {', '.join(VARIANTS)}")
    cfg = stage3_tools(world, "levers", 10**6).config
    init_distributed()
    model, _, stream, _ = build_run(cfg, 0, 1)
    engine, dtype = make_engine(cfg, model, 10**6, 1)
    engine.train()
    it = cycle_batches(stream)
    data = [next(it) for _ in range(batches)]
    concat = fused.CONCAT["cpu"]
    rates: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for v in variants:  # a warm-up step each
            _set(engine.module, v)
            train_step(engine, data[0], dtype)
        for _ in range(rounds):
            for batch in data:
                for v in variants:
                    _set(engine.module, v)
                    t0 = time.perf_counter()
                    train_step(engine, batch, dtype)
                    rates[v].append(batch_flops(world.sizes.llm, batch) / (time.perf_counter() - t0) / 1e9)
    finally:
        fused.CONCAT["cpu"] = concat
    base = variants[0]
    return {
        v: {
            "median_gflops": statistics.median(r),
            f"vs_{base}": statistics.median(a / b for a, b in zip(r, rates[base])),
            "steps": len(r),
        }
        for v, r in rates.items()
    }
