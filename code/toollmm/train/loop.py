"""One recipe for every stage: build -> (resume) -> loop -> save. Stages differ only in config.

The DeepSpeed engine runs every step, CPU included (gloo, fp32). Each optimiser step logs one metrics
line (every loss term, lr, grad norm, real tokens/s, samples/s, real-token fraction, memory); validation
runs every ``train.eval_every`` steps; resume checkpoints every ``train.save_every`` steps and at the
end; the loadable stage folder (``toollmm.checkpoint``) is written last.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .. import configlib
from ..checkpoint import load_into, save_stage
from ..config import Loaded
from ..paths import ensure_torch_extensions_dir, resolve
from .ds import build_ds_config, compute_dtype, init_distributed, shutdown_distributed
from .resume import ResumeCheckpoints
from .schedule import make_scheduler
from .targets import precompute_captions
from .tracking import Tracker, memory_mb, setup_logging

log = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_dir_of(cfg) -> Path:
    return resolve(cfg.run.output_root) / cfg.run.name / f"stage_{cfg.run.stage}"


def run_stage(loaded: Loaded, resume: bool = False) -> dict:
    """Train the stage described by ``loaded``; returns the final metrics (rank 0's view)."""
    ensure_torch_extensions_dir()
    rank, local_rank, world = init_distributed()
    setup_logging(rank, loaded.config.logging.level)
    try:
        return _run(loaded, rank, local_rank, world, resume)
    finally:
        shutdown_distributed()


def build_parts(cfg, rank: int, world: int):
    """``(model, trainable counts, train stream, held-out stream or None)``: model (+ init_from) and the
    data streams; media come from the feature cache when enabled."""
    from ..data.pipeline import make_processor
    from ..data.stream import TrainStream
    from ..model.toollmm_model import build_model

    needs_media = _has_media(cfg)
    encoder = cache = None
    if needs_media:
        from ..model.encoder import build_encoder

        encoder = build_encoder(cfg.model)
        if cfg.model.feature_cache.enabled:
            from .features import precompute_features

            cache = precompute_features(cfg, encoder, rank, world)
            encoder = None  # cached features only: no encoder weights in the engine or the workers
    seed_all(cfg.run.seed)  # identical init on every rank
    model = build_model(cfg.model, encoder=encoder, loss_weights=cfg.train.loss_weights)
    if cfg.train.init_from:
        report = load_into(model, resolve(cfg.train.init_from))
        log.info("init_from %s: parts %s", cfg.train.init_from, report.parts)
    counts = model.trainable_parameters(cfg.train.trainable)
    decoder_ids = precompute_captions(cfg, model, rank)
    tok = model.bundle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    processor = make_processor(cfg, tok, feature_lookup=cache.lookup if cache else None)
    kw = {"rank": rank, "world_size": world, "decoder_ids": decoder_ids}
    stream = TrainStream.from_config(cfg, processor, pad, **kw)
    heldout = (
        TrainStream.from_config(cfg, processor, pad, split="heldout", **kw) if cfg.data.heldout else None
    )
    return model, counts, stream, heldout


def make_engine(cfg, model, steps: int, world: int):
    """``(engine, compute dtype)``: the DeepSpeed engine over the model's optimiser groups."""
    import deepspeed

    ds = build_ds_config(cfg, world)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.param_groups(cfg.train.optim),
        config=ds,
        lr_scheduler=lambda opt: make_scheduler(opt, steps, cfg.train.optim),
    )
    return engine, compute_dtype(ds)


def train_step(engine, batch, dtype) -> dict:
    """One micro-batch: forward, backward, and the engine's step (an optimiser step at the accumulation
    boundary). Returns the loss terms."""
    out = engine(batch.to(engine.device, dtype))
    engine.backward(out["loss"])
    engine.step()
    return out


def _has_media(cfg) -> bool:
    """Cheap check: does any source record mention a medium? (the first lines of each JSONL)."""
    import json

    for src in list(cfg.data.train) + list(cfg.data.heldout):
        p = resolve(src.path)
        if p.is_dir():
            return True  # shards: assume media
        with open(p, encoding="utf-8") as f:
            for _, line in zip(range(200), f):
                if line.strip() and any(json.loads(line).get(k) for k in ("images", "videos", "audios")):
                    return True
    return False


def total_steps(cfg, stream) -> int:
    if cfg.train.max_steps:
        return int(cfg.train.max_steps)
    return max(1, math.ceil(stream.steps_per_epoch * cfg.train.epochs / cfg.train.grad_accum))


def _run(loaded: Loaded, rank: int, local_rank: int, world: int, resume: bool) -> dict:
    cfg = loaded.config
    stage_dir = stage_dir_of(cfg)
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config_resolved.txt").write_text(loaded.describe() + "\n", encoding="utf-8")
        log.info(
            "stage %d -> %s (world %d); resolved config in config_resolved.txt",
            cfg.run.stage,
            stage_dir,
            world,
        )
    t_start = time.perf_counter()
    model, counts, stream, heldout = build_parts(cfg, rank, world)
    steps = total_steps(cfg, stream)
    engine, dtype = make_engine(cfg, model, steps, world)
    ckpts = ResumeCheckpoints(stage_dir / "ckpt", rank, local_rank, cfg.train.keep_last)
    step = 0
    if resume:
        state = ckpts.load(engine)
        step = int(state["step"])
        stream.load_state_dict(state["data"])
    tracker = Tracker(
        stage_dir,
        rank,
        steps,
        cfg.logging.wandb_mode,
        cfg.logging.wandb_project,
        f"{cfg.run.name}-stage{cfg.run.stage}",
        configlib.to_dict(cfg),
        step,
    )
    if rank == 0 and step == 0:
        tracker.log(
            {
                "event": "start",
                "trainable": counts,
                "steps": steps,
                "world": world,
                "steps_per_epoch": stream.steps_per_epoch,
            },
            0,
        )
    window = _Window()
    last_val = None
    engine.train()
    while step < steps:
        for batch in stream:
            out = train_step(engine, batch, dtype)
            window.add(out, batch)
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            tracker.advance(1, loss=window.mean("loss"))
            if step % cfg.train.log_every == 0 or step == steps:
                tracker.log(window.metrics(engine, world), step)
                window = _Window()
            if (
                heldout is not None
                and cfg.train.eval_every
                and step % cfg.train.eval_every == 0
                and step < steps
            ):
                last_val = validate(engine, heldout, dtype, cfg.train.eval_batches)
                tracker.log({f"val_{k}": v for k, v in last_val.items()}, step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < steps:
                ckpts.save(engine, step, {"data": stream.state_dict()})
            if step >= steps:
                break
    if heldout is not None:
        last_val = validate(engine, heldout, dtype, cfg.train.eval_batches)
        tracker.log({f"val_{k}": v for k, v in last_val.items()}, step)
    ckpts.save(engine, step, {"data": stream.state_dict()})
    wall = time.perf_counter() - t_start
    _save_loadable(
        engine,
        model,
        cfg,
        stage_dir,
        rank,
        {"wall_s": round(wall, 2), "steps": step, "val": last_val, "data": stream.stats()},
    )
    tracker.log({"event": "end", "wall_s": round(wall, 2), "data": stream.stats()}, step)
    tracker.close()
    return {"steps": step, "wall_s": wall, "val": last_val, "stage_dir": str(stage_dir)}


class _Window:
    """Loss terms and token counts since the last metrics line."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.n = 0
        self.real = self.total = self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, out: dict, batch) -> None:
        for k, v in out.items():
            self.sums[k] += float(v.detach())
        self.n += 1
        self.real += batch.real_tokens
        self.total += batch.input_ids.numel()
        self.samples += sum(len(r) for r in batch.sample_ids)

    def mean(self, key: str) -> float:
        return self.sums[key] / max(1, self.n)

    def metrics(self, engine, world: int) -> dict:
        dt = max(1e-9, time.perf_counter() - self.t0)
        gn = engine.get_global_grad_norm()
        return {
            **{k: self.mean(k) for k in sorted(self.sums)},
            "lr": float(engine.get_lr()[0]),
            "grad_norm": float(gn) if gn is not None else None,
            "tok_s": self.real * world / dt,
            "samples_s": self.samples * world / dt,
            "real_token_fraction": self.real / max(1, self.total),
            "mem_mb": round(memory_mb(), 1),
        }


@torch.no_grad()
def validate(engine, heldout, dtype, max_batches: int | None = None) -> dict:
    """Mean of every loss term over the held-out stream (each rank its share, averaged over ranks)."""
    engine.eval()
    sums: dict[str, float] = defaultdict(float)
    n = 0
    heldout.epoch, heldout.consumed = 0, 0  # the same held-out batches every time
    for i, batch in enumerate(heldout):
        if max_batches and i >= max_batches:
            break
        if batch.real_tokens == 0:
            continue
        for k, v in engine(batch.to(engine.device, dtype)).items():
            sums[k] += float(v)
        n += 1
    engine.train()
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [n], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return {k: float(t[i] / max(1.0, float(t[-1]))) for i, k in enumerate(keys)}


def _save_loadable(engine, model, cfg, stage_dir: Path, rank: int, extra: dict) -> None:
    """Stage folder (+ optional full-LLM export), with ZeRO-3 parameters gathered first."""
    import deepspeed

    params = [p for p in model.parameters()]
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if engine.zero_optimization_partition_weights()
        else _nullctx()
    )
    with gather:
        if rank == 0:
            save_stage(model, cfg, stage_dir, extra)
            if cfg.train.export_llm:
                from ..checkpoint import export_llm

                export_llm(model, resolve(cfg.train.export_llm))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
