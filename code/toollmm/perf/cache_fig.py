"""Feature-cache figure: stage-1 step time with cached encoder features vs encoding every step.

Per modality, two stage-1 setups (``config/stage_1.yaml``: only the input projection trains) over the same
samples of the demo's ``x2t_<modality>`` file, same order, ``num_workers 0`` and windows of one batch so
every cost lands in the timed step of its batch, built side by side in one process and stepped alternately (a change of machine load hits both):
(a) feature cache on (the pre-pass fills it first; its time is reported, not timed in the steps); (b) cache
off: each step decodes and preprocesses its media and runs the frozen encoder. In (b) the media decoding +
preprocessing (the processor's decoder) and the encoder forward are timed on their own (``e``).

    speedup       = step time (b) / step time (a)
    ideal_speedup = step time (b) / (step time (b) - encoding time per step)   (encoding for free)
    efficiency    = speedup / ideal_speedup = (b - encoding) / (a)

The encoder is an ImageBind of huge's depths with widths scaled so that its FLOPs per medium, relative to
the LLM's stage-1 training FLOPs per sample, equal ImageBind-huge's relative to Vicuna-7B's
(``toollmm.perf.world.encoder_dims_for``; both ratios are reported).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from toollmm.core.config import PreprocessConfig
from toollmm.perf.flops import VICUNA_7B, encoder_flops_per_input, train_flops
from toollmm.perf.train_step import train_step
from toollmm.perf.world import HUGE, World
from toollmm.train.build import build_run
from toollmm.train.ds import init_distributed
from toollmm.train.loop import make_engine


class _Timed:
    """Wraps a callable and adds its wall time to ``clock[0]``."""

    def __init__(self, fn, clock: list):
        self.fn, self.clock = fn, clock

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.clock[0] += time.perf_counter() - t0


def subset(world: World, name: str, n: int) -> Path:
    """``n`` records spread evenly over a training file (every k-th), as their own JSONL (the media stay
    where they are): a mixed file's subset keeps its mix."""
    src = world.demo / "train" / f"{name}.jsonl"
    out = world.work / "subsets" / f"{world.demo.name}_{name}_{n}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        out.write_text("".join(lines[:: max(1, len(lines) // n)][:n]), encoding="utf-8")
    return out


def cache_subset(world: World, modality: str) -> Path:
    """The ``x2t_<modality>`` subset a feature-cache figure steps through (``stage1_micro_batch x (warmup +
    cache_steps)`` records); the stage-1 MFU figure trains on the same records, so both share the cache."""
    s = world.sizes
    return subset(world, f"x2t_{modality}", s.stage1_micro_batch * (s.warmup + s.cache_steps))


class _Run:
    """One stage-1 setup ready to step: engine, its stream's iterator, and (cache off) the encoding clock."""

    def __init__(self, world: World, name: str, data: dict, cache: bool):
        s = world.sizes
        cfg = world.config(
            name,
            1,
            train={"micro_batch_size": s.stage1_micro_batch, "max_steps": 10**6},
            data=data,
            model={"feature_cache": {"enabled": cache}},
        ).config
        t0 = time.perf_counter()
        self.model, _, stream, _ = build_run(cfg, 0, 1)
        self.prepass = time.perf_counter() - t0
        self.engine, self.dtype = make_engine(cfg, self.model, 10**6, 1)
        self.clock = [0.0]  # cache off: decoding + preprocessing + encoder; cache on: feature lookups
        stream.processor.decode = _Timed(stream.processor.decode, self.clock)
        if not cache:
            self.model.encoder.encode = _Timed(self.model.encoder.encode, self.clock)
        self.it = iter(stream)

    def step(self) -> tuple[float, float]:
        """(wall time of one step including its data, the encoding part of it)."""
        self.clock[0] = 0.0
        t0 = time.perf_counter()
        train_step(self.engine, next(self.it), self.dtype)
        return time.perf_counter() - t0, self.clock[0]


def flop_ratios(world: World, modality: str) -> dict:
    """Encoder FLOPs per medium over the LLM's stage-1 training FLOPs per sample: bench vs the real pair."""
    st = world.token_stats(f"x2t_{modality}")
    n, sup = round(st["tokens"]), round(st["supervised"])
    pre = PreprocessConfig()
    dims = type(HUGE)(**world.encoder_dims())
    bench = encoder_flops_per_input(dims, pre, modality) / train_flops(world.sizes.llm, [n], sup)
    real = encoder_flops_per_input(HUGE, pre, modality) / train_flops(VICUNA_7B, [n], sup)
    return {"bench": bench, "imagebind_huge_over_vicuna_7b": real}


def feature_cache(world: World, modality: str) -> dict:
    s = world.sizes
    data = {
        "train": [{"path": str(cache_subset(world, modality)), "media_root": str(world.demo)}],
        "num_workers": 0,
        "group_window": 1,  # each batch loads (and decodes) its own samples inside its own step
        "shuffle": False,
        "max_length": s.max_length,
    }
    init_distributed()
    cached = _Run(world, f"cache_{modality}_on", data, cache=True)
    fresh = _Run(world, f"cache_{modality}_off", data, cache=False)
    for _ in range(s.warmup):
        cached.step()
        fresh.step()
    pairs = []  # interleaved, so a change of machine load hits both sides alike
    for _ in range(s.cache_steps):
        a, lookup = cached.step()
        b, e = fresh.step()
        pairs.append((a, b, e, lookup))
    a, b, e, lookup = (statistics.mean(x) for x in zip(*pairs))
    speedup = b / a
    ideal = b / max(b - e, 1e-9)
    return {
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal,
        "step_s_cached": a,
        "step_s_encoding": b,
        "encode_s_per_step": e,
        "lookup_s_per_step": lookup,
        "per_step_efficiency": [round((bb - ee) / aa, 3) for aa, bb, ee, _ in pairs],
        "prepass_s": cached.prepass,
        "flop_ratio": flop_ratios(world, modality),
        "encoder_dims": json.loads(json.dumps(world.encoder_dims())),
    }
