"""One recipe for every stage: build -> (resume) -> loop -> save. Stages differ only in config.

The DeepSpeed engine runs every step, CPU included (gloo, fp32). One optimiser step is ``grad_accum``
micro-batches whose gradients are reduced across ranks ONCE, in a fixed parameter order
(``engine.coalesce_grad_reduction``), so ranks whose batches use different modules (an image batch here, a
text-only or padding batch there) still sum the same gradients (ZeRO-2's per-hook buckets otherwise
follow each rank's own backward order). Each logged step writes one metrics line (every loss term,
lr, grad norm, real tokens/s, samples/s, real-token fraction, memory); validation runs every
``train.eval_every`` steps; resume checkpoints every ``train.save_every`` steps and at the end; the
loadable stage folder (``toollmm.checkpoint``) is written last.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

from toollmm.core import configlib
from toollmm.core.config import Loaded
from toollmm.core.paths import ensure_torch_extensions_dir, resolve

from .build import build_run, check_init_from_bases, resolve_init_from, total_steps
from .ds import build_ds_config, compute_dtype, init_distributed
from .finish import SeenSamples, rank_report, save_loadable
from .lock import hold_stage
from .resume import ResumeCheckpoints
from .schedule import make_scheduler
from .tracking import MetricsWindow, Tracker, setup_logging, term_present

log = logging.getLogger(__name__)


def stage_dir_of(cfg) -> Path:
    return resolve(cfg.run.output_root) / cfg.run.name / f"stage_{cfg.run.stage}"


def run_stage(loaded: Loaded, resume: bool = False) -> dict:
    """Train the stage described by ``loaded``. Returns ``steps``, ``wall_s``, ``val`` (last validation),
    ``stage_dir``, ``ranks`` (the rank report) and ``model`` (the trained ToolLMM, for in-process use).
    The stage folder is locked for the whole run (``train.lock``: a second run on it is refused, naming
    this one); the lock is released on return, so one process can run stage after stage."""
    ensure_torch_extensions_dir()
    rank, local_rank, world = init_distributed()
    setup_logging(rank, loaded.config.logging.level)
    with hold_stage(stage_dir_of(loaded.config), rank):
        return _run(loaded, rank, local_rank, world, resume)


def batches(stream):
    """The stream's batches epoch after epoch, each fetched with the global CPU RNG set aside: starting
    a DataLoader draws from it, and a resumed run starts one mid-epoch, so without this its dropout
    would differ from an uninterrupted run's. (Workers seed themselves from (seed, epoch, rank).)"""
    if stream.steps_per_epoch < 1:
        raise ValueError("the training stream has no batches (no records for this rank?)")
    while True:
        it = iter(stream)
        try:
            while True:
                with torch.random.fork_rng(devices=[]):
                    batch = next(it, None)
                if batch is None:
                    break
                yield batch
        finally:
            it.close()  # stops the DataLoader workers when training ends mid-epoch


def optimiser_step(engine, source, ga: int, dtype, window: MetricsWindow, seen: SeenSamples) -> None:
    """``ga`` micro-batches forward/backward, gradients reduced once, then one optimiser step."""
    t0 = time.perf_counter()
    coalesce = engine.zero_optimization_stage() >= 1 and hasattr(engine.optimizer, "_coalesce_grad_reduction")
    if coalesce:
        engine.set_gradient_accumulation_boundary(True)  # the step() after the block is the boundary
    with engine.coalesce_grad_reduction() if coalesce else nullcontext():
        for _ in range(ga):
            batch = next(source)
            out = engine(batch.to(engine.device, dtype))
            engine.backward(out["loss"])
            window.add(out, batch)
            seen.add(batch)
            if not coalesce:
                engine.step()  # DeepSpeed's own micro-step count decides the boundary
    if coalesce:
        engine.step()
    window.seconds += time.perf_counter() - t0
    window.steps += 1


def make_engine(cfg, model, steps: int, world: int):
    """``(engine, compute dtype)``: the DeepSpeed engine over the model's optimiser groups, with the
    stage's schedule over ``steps`` optimiser steps."""
    import deepspeed

    ds = build_ds_config(cfg, world)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.param_groups(cfg.train.optim),
        config=ds,
        lr_scheduler=lambda opt: make_scheduler(opt, steps, cfg.train.optim),
    )
    return engine, compute_dtype(ds)


def _run(loaded: Loaded, rank: int, local_rank: int, world: int, resume: bool) -> dict:
    cfg = loaded.config
    stage_dir = stage_dir_of(cfg)
    resolve_init_from(cfg, stage_dir)
    check_init_from_bases(cfg, rank)
    ckpts = ResumeCheckpoints(stage_dir / "ckpt", rank, local_rank, cfg.train.keep_last)
    resume = _resume_decision(ckpts, resume)
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config_resolved.txt").write_text(loaded.describe() + "\n", encoding="utf-8")
        log.info("stage %d -> %s (world %d)", cfg.run.stage, stage_dir, world)
    t_start = time.perf_counter()
    log.info(
        "building the model (LLM %s) and the data (%d training sources)",
        cfg.model.llm.path,
        len(cfg.data.train),
    )
    prepass: dict = {}
    model, counts, stream, heldout = build_run(cfg, rank, world, prepass)
    steps = total_steps(cfg, stream)
    log.info("starting the DeepSpeed engine: %d optimiser steps, %d per epoch", steps, stream.steps_per_epoch)
    engine, dtype = make_engine(cfg, model, steps, world)
    step, seen = 0, SeenSamples()
    if resume:
        state = ckpts.load(engine)
        step, seen = int(state["step"]), SeenSamples(state.get("seen"))
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
    if step == 0:
        start = {"trainable": counts, "steps": steps, "world": world, "dtype": str(dtype), **prepass}
        tracker.log({"event": "start", **start, "steps_per_epoch": stream.steps_per_epoch}, 0)
    source = batches(stream)
    window, last_val = MetricsWindow(), None
    engine.train()
    while step < steps:
        optimiser_step(engine, source, cfg.train.grad_accum, dtype, window, seen)
        step += 1
        tracker.advance(1, loss=window.mean("loss"))
        if step % cfg.train.log_every == 0 or step == steps:
            tracker.log(window.metrics(engine, stream), step)
            window = MetricsWindow()
        if heldout is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
            last_val = validate(engine, heldout, dtype, cfg.train.eval_batches)
            tracker.log({f"val_{k}": v for k, v in last_val.items()}, step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < steps:
            ckpts.save(engine, step, {"data": stream.state_dict(), "seen": seen.state()})
    source.close()
    if heldout is not None:
        last_val = validate(engine, heldout, dtype, cfg.train.eval_batches)
        tracker.log({f"val_{k}": v for k, v in last_val.items()}, step)
    ckpts.save(engine, step, {"data": stream.state_dict(), "seen": seen.state()})
    ranks = rank_report(engine, model, seen, stream, rank, stage_dir)
    wall = time.perf_counter() - t_start
    extra = {"wall_s": round(wall, 2), "steps": step, "val": last_val, "data": stream.stats()}
    save_loadable(engine, model, cfg, stage_dir, rank, extra)
    tracker.log({"event": "end", "wall_s": round(wall, 2), "data": stream.stats()}, step)
    tracker.close()
    out = {"steps": step, "wall_s": wall, "val": last_val, "stage_dir": str(stage_dir), "ranks": ranks}
    return {**out, "model": model}


def _resume_decision(ckpts: ResumeCheckpoints, resume: bool) -> bool:
    """``--resume`` without a checkpoint starts the stage from scratch (a restarted job always passes
    ``--resume``); a fresh start over existing checkpoints replaces them. Both are said out loud."""
    tag = ckpts.latest()
    if resume and tag is None:
        log.warning("--resume: no complete checkpoint in %s yet; starting the stage from step 0", ckpts.dir)
        return False
    if not resume and tag is not None:
        log.warning(
            "%s holds a resume checkpoint (%s) but --resume was not given: training from step 0; "
            "its checkpoints will be replaced",
            ckpts.dir,
            tag,
        )
    return resume


@torch.no_grad()
def validate(engine, heldout, dtype, max_batches: int | None = None) -> dict:
    """Mean of every loss term over the held-out batches that hold real tokens and really had that term
    (``term_present``: no ``align_<m>`` zeros from batches without ``m`` targets; each rank its share,
    averaged over ranks). Padding batches run too (ZeRO-3 ranks must make the same module calls) but
    are not counted."""
    engine.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)  # batches that really had the term (term_present)
    heldout.epoch, heldout.consumed = 0, 0  # the same held-out batches every time
    it = iter(heldout)
    for _ in range(len(heldout) if not max_batches else min(max_batches, len(heldout))):
        with torch.random.fork_rng(devices=[]):
            batch = next(it)
        out = engine(batch.to(engine.device, dtype))
        if batch.real_tokens == 0:
            continue
        for k, v in out.items():
            if term_present(k, batch):
                sums[k] += float(v)
                counts[k] += 1
            else:
                sums[k] += 0.0
    it.close()
    engine.train()
    keys = sorted(sums)
    if torch.distributed.is_initialized():  # ranks may have seen no real batch: agree on the keys
        got = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(got, keys)
        keys = sorted({k for ks in got for k in ks})
    t = torch.tensor(
        [sums.get(k, 0.0) for k in keys] + [float(counts.get(k, 0)) for k in keys],
        dtype=torch.float64,
        device=engine.device,
    )
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return {k: float(t[i] / t[len(keys) + i]) for i, k in enumerate(keys) if float(t[len(keys) + i]) > 0}
