"""Learning-rate schedule: linear warmup, then constant / cosine / linear decay to ``min_lr_ratio``.

A ``LambdaLR`` multiplies each parameter group's own base lr, so per-group learning rates
(``train.optim.group_lr``) keep their ratios through the schedule.
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def make_scheduler(optimizer, total_steps: int, optim_cfg) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, total_steps, optim_cfg.warmup_steps, optim_cfg.schedule, optim_cfg.min_lr_ratio
        ),
    )
