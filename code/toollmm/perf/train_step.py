"""The trainer's step as the benchmarks time it: ``toollmm.train.loop.optimiser_step`` itself (forward,
backward, the coalesced gradient reduction, the optimiser step) over one given micro-batch."""

from __future__ import annotations

from toollmm.train.finish import SeenSamples
from toollmm.train.loop import optimiser_step
from toollmm.train.tracking import MetricsWindow


def train_step(engine, batch, dtype) -> MetricsWindow:
    """One optimiser step of ``grad_accum`` 1 on ``batch``, exactly as ``run_stage`` takes it (the loss
    terms stay on the device, as in training). Returns the step's metrics window."""
    window = MetricsWindow()
    optimiser_step(engine, iter([batch]), 1, dtype, window, SeenSamples())
    return window
