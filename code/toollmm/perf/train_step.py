"""The trainer's step as the benchmarks time it: ``toollmm.train.loop.optimiser_step`` itself (forward,
backward, the coalesced gradient reduction, the optimiser step) over one given micro-batch; and
``split_step``, the same calls with a clock between them."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from toollmm.train.finish import SeenSamples
from toollmm.train.loop import optimiser_step
from toollmm.train.tracking import MetricsWindow


def train_step(engine, batch, dtype) -> MetricsWindow:
    """One optimiser step of ``grad_accum`` 1 on ``batch``, exactly as ``run_stage`` takes it (the loss
    terms stay on the device, as in training). Returns the step's metrics window."""
    window = MetricsWindow()
    optimiser_step(engine, iter([batch]), 1, dtype, window, SeenSamples())
    return window


def split_step(engine, batch, dtype) -> dict[str, float]:
    """One optimiser step on ``batch`` with ``optimiser_step``'s calls for ``grad_accum`` 1 (boundary,
    coalesced reduction block, ``engine(batch)``, ``engine.backward``, the block's exit, ``engine.step``),
    timed one by one with the device synchronised between them. Returns seconds: ``forward_s`` (batch to
    the device + forward), ``backward_s``, ``grad_reduce_s`` (the coalesced gradient reduction at the
    block's exit), ``optimizer_s`` (``engine.step``: clipping, the optimiser, the scheduler) and
    ``total_s``."""
    dev = torch.device(engine.device)

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    coalesce = engine.zero_optimization_stage() >= 1 and hasattr(engine.optimizer, "_coalesce_grad_reduction")
    t0 = clock()
    if coalesce:
        engine.set_gradient_accumulation_boundary(True)
    with engine.coalesce_grad_reduction() if coalesce else nullcontext():
        out = engine(batch.to(engine.device, dtype))
        t1 = clock()
        engine.backward(out["loss"])
        t2 = clock()
        if not coalesce:
            engine.step()
    t3 = clock()
    if coalesce:
        engine.step()
    t4 = clock()
    split = {"forward_s": t1 - t0, "backward_s": t2 - t1, "grad_reduce_s": t3 - t2, "optimizer_s": t4 - t3}
    if not coalesce:  # the step ran inside the block: reduction and optimiser are one figure
        split = {**split, "grad_reduce_s": 0.0, "optimizer_s": t3 - t2 + t4 - t3}
    return {**split, "total_s": t4 - t0}
