"""The epoch plan: which sample goes to which rank, window and micro-batch, as a pure function of the
source sizes, the mixture, the seed and the epoch.

* Mixture: source ``s`` contributes ``counts[s]`` samples per epoch (``mixture: scale``: ``weight x size``,
  so 1.0 = one pass and 0.5 = a random half; ``ratio``: the weights are proportions of ``epoch_samples``).
  Each source walks an endless chain of seeded permutations of itself, so up- or down-sampled sources see
  every item before any repeats, across epochs.
* The sources' draws are merged by a seeded shuffle (or a stable interleave when ``shuffle`` is off) and
  dealt to ranks round-robin. Every rank takes ``steps_per_epoch`` micro-batches, computed from the
  plan alone, so all ranks agree without talking (a short rank's missing samples become padding batches).
* A rank's plan is cut into windows of ``window`` micro-batches; a worker loads a whole window, drops bad
  samples, optionally sorts it by length, and emits exactly ``window`` batches (empty ones are padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_MIX, _SOURCE, _BATCHES = 1, 2, 3  # rng stream tags


def rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *(int(t) for t in tags)])


def mixture_counts(
    sizes: Sequence[int], weights: Sequence[float], mode: str = "scale", epoch_samples: int | None = None
) -> list[int]:
    """Samples per source per epoch."""
    if len(sizes) != len(weights):
        raise ValueError("one weight per source")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"mixture weights must be >= 0 and not all 0, got {list(weights)}")
    if mode == "scale":
        counts = [int(round(n * w)) for n, w in zip(sizes, weights)]
        if epoch_samples is not None:
            counts = _apportion(epoch_samples, [float(c) for c in counts])
    elif mode == "ratio":
        counts = _apportion(sum(sizes) if epoch_samples is None else epoch_samples, list(weights))
    else:
        raise ValueError(f"unknown mixture mode {mode!r} (scale | ratio)")
    empty = [i for i, (n, c) in enumerate(zip(sizes, counts)) if c > 0 and n == 0]
    if empty:
        raise ValueError(f"source(s) {empty} have no samples but a positive mixture weight")
    return counts


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of ``total`` in proportion to ``weights``."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


def source_draws(size: int, count: int, epoch: int, seed: int, source: int, shuffle: bool) -> np.ndarray:
    """Items ``[epoch*count, (epoch+1)*count)`` of the source's endless chain of permutations."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    start, stop = epoch * count, (epoch + 1) * count
    out = []
    for cycle in range(start // size, (stop - 1) // size + 1):
        perm = rng(seed, _SOURCE, source, cycle).permutation(size) if shuffle else np.arange(size)
        lo, hi = max(start - cycle * size, 0), min(stop - cycle * size, size)
        out.append(perm[lo:hi])
    return np.concatenate(out).astype(np.int64)


def epoch_plan(
    sizes: Sequence[int], counts: Sequence[int], epoch: int, seed: int, shuffle: bool = True
) -> np.ndarray:
    """``[N, 2]`` rows of ``(source, item)`` for one epoch over all ranks."""
    parts, keys = [], []
    for s, (n, c) in enumerate(zip(sizes, counts)):
        items = source_draws(n, c, epoch, seed, s, shuffle)
        parts.append(np.stack([np.full(c, s, dtype=np.int64), items], axis=1))
        keys.append((np.arange(c) + 0.5) / max(c, 1))  # stable interleave position
    plan = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    if shuffle:
        return plan[rng(seed, _MIX, epoch).permutation(len(plan))]
    return plan[np.argsort(np.concatenate(keys), kind="stable")]


def rank_plan(plan: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    return plan[rank::world_size]


def steps_per_epoch(total: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches every rank takes per epoch (the longest rank's share, rounded up)."""
    return math.ceil(math.ceil(total / world_size) / micro_batch_size)


def windows(steps: int, window: int) -> list[range]:
    """Batch indices of each window of a rank's epoch."""
    return [range(s, min(s + window, steps)) for s in range(0, steps, window)]


def group_batches(
    lengths: Sequence[int], n_batches: int, micro_batch_size: int, by_length: bool, gen: np.random.Generator
) -> list[list[int]]:
    """Split a window's surviving samples (given in plan order) into exactly ``n_batches`` micro-batches.

    With ``by_length`` the survivors are sorted longest first and chunked, and the chunks shuffled, so
    each batch holds similar lengths; empty trailing chunks are the window's padding batches.
    """
    idx = list(range(len(lengths)))
    if by_length:
        idx.sort(key=lambda i: (-lengths[i], i))
    chunks = [idx[i : i + micro_batch_size] for i in range(0, len(idx), micro_batch_size)]
    if len(chunks) > n_batches:
        raise ValueError(f"{len(lengths)} samples do not fit {n_batches} batches of {micro_batch_size}")
    if by_length:
        chunks = [chunks[i] for i in gen.permutation(len(chunks))]
    return chunks + [[] for _ in range(n_batches - len(chunks))]
