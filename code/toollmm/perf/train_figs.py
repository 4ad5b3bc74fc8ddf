"""Training figures: MFU of the stage-3 step, our trainer's real tokens/s, real-token fractions, and the
data pipeline against the trainer. All of them train through ``toollmm.train`` (``build_run``,
``make_engine`` and the loop's ``optimiser_step``, or the whole ``run_stage``) on the demo corpus.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from toollmm.model.losses import next_token_targets
from toollmm.perf.flops import (
    LlamaShape,
    OutProjShape,
    input_proj_train_flops,
    output_proj_train_flops,
    stage1_flops,
    stage2_flops,
    train_flops,
)
from toollmm.perf.gemm import BURST_SHAPES, gemm_gflops
from toollmm.perf.train_step import split_step, train_step
from toollmm.perf.world import World
from toollmm.train.build import build_run
from toollmm.train.ds import init_distributed
from toollmm.train.loop import make_engine, run_stage, stage_dir_of

log = logging.getLogger(__name__)


def sample_lengths(batch) -> list[int]:
    """Real samples' lengths: from the padding mask, or from the restarts of a packed row's position ids
    (padding positions restart at 0 each and so are runs of one)."""
    if batch.attention_mask.dim() == 2:
        out = [int(x) for x in batch.attention_mask.sum(1).tolist() if x]
    else:
        out = []
        for row in batch.position_ids.tolist():
            run = 0
            for p in row + [0]:
                if p == 0:
                    if run > 1:
                        out.append(run)
                    run = 1
                else:
                    run += 1
    if sum(out) != batch.real_tokens:
        raise ValueError(f"sample lengths {out} do not add up to the batch's {batch.real_tokens} real tokens")
    return out


def batch_flops(shape: LlamaShape, batch) -> float:
    """Model FLOPs of one training step on ``batch`` (``toollmm.perf.flops``)."""
    starts = (batch.position_ids == 0) if batch.attention_mask.dim() == 4 else None
    keep, _ = next_token_targets(batch.labels, starts)
    return train_flops(shape, sample_lengths(batch), int(keep.sum()))


def stage3_tools(world: World, name: str, steps: int, **data) -> object:
    """Stage 3 (config/stage_3.yaml's trainable set, dsconfig/stage_3.json) on the demo's tool-use file:
    packed rows of at most ``max_length`` tokens."""
    s = world.sizes
    return world.config(
        name,
        3,
        train={"micro_batch_size": s.micro_batch, "max_steps": steps},
        data={
            "train": [world.source("train", "tools", task="instruct")],
            "max_length": s.max_length,
            "packing": True,
            **data,
        },
    )


def cycle_batches(stream):
    while True:
        yield from stream


def mfu(world: World, profile_to=None) -> dict:
    """Timed steps, each bracketed by GEMM bursts; MFU of a step = its model FLOP/s over the mean GEMM
    FLOP/s of the bursts just before and after it (the machine is shared: the pairing keeps load changes
    out of the ratio); the median step is reported. ``mfu_vs_best_gemm`` divides the median step rate by
    the fastest burst of the run instead (the machine's limit when nothing else runs)."""
    s = world.sizes
    cfg = stage3_tools(world, "mfu", 10**6).config
    init_distributed()
    model, _, stream, _ = build_run(cfg, 0, 1)
    engine, dtype = make_engine(cfg, model, 10**6, 1)
    engine.train()  # as run_stage does (from_pretrained leaves the base layers in eval mode)
    it = cycle_batches(stream)
    out = _timed_steps(engine, it, dtype, lambda b: batch_flops(s.llm, b), s, s.rounds)
    if profile_to is not None:
        _profile(engine, it, dtype, profile_to)
    return {**out, **_device_memory(engine.device)}


def _timed_steps(engine, it, dtype, flops_of, s, rounds: int) -> dict:
    """``s.warmup`` untimed steps, then ``rounds x s.steps_per_round`` steps (``train_step``), each between
    two GEMM bursts; the MFU figures of ``mfu`` (see there) with ``flops_of(batch)`` model FLOPs a step."""
    for _ in range(s.warmup):
        train_step(engine, next(it), dtype)
    bursts = [gemm_gflops(s.gemm_seconds, engine.device, shapes=BURST_SHAPES)]
    steps, shapes = [], []
    for _ in range(rounds * s.steps_per_round):
        batch = next(it)
        shapes.append(tuple(batch.input_ids.shape))
        _sync(engine.device)
        t0 = time.perf_counter()
        train_step(engine, batch, dtype)
        _sync(engine.device)
        dt = time.perf_counter() - t0
        bursts.append(gemm_gflops(s.gemm_seconds, engine.device, shapes=BURST_SHAPES))
        steps.append(
            {"gflops": flops_of(batch) / dt / 1e9, "tokens_per_s": batch.real_tokens / dt, "step_s": dt}
        )
    g = [b["gflops"] for b in bursts]
    ratios = [st["gflops"] / ((g[i] + g[i + 1]) / 2) for i, st in enumerate(steps)]
    step_rate = statistics.median(st["gflops"] for st in steps)
    return {
        "gemm_gflops": statistics.median(g),
        "gemm_gflops_best": max(g),
        "mfu": statistics.median(ratios),
        "mfu_vs_best_gemm": step_rate / max(g),
        "step_gflops": step_rate,
        "tokens_per_s": statistics.median(st["tokens_per_s"] for st in steps),
        "step_s": statistics.median(st["step_s"] for st in steps),
        "per_step_mfu": [round(r, 3) for r in ratios],
        "batch_shapes": sorted(set(shapes)),
        "gemm_by_shape": bursts[-1]["by_shape"],
    }


# ------------------------------------------------------------------------------ stages 1 and 2
def stage1_captions(world: World, name: str) -> object:
    """Stage 1 (config/stage_1.yaml's trainable set, dsconfig/stage_1.json) on the demo's three X->text
    caption files, media from the feature cache (the pre-pass fills it; the step never runs the encoder).
    Each file contributes the same evenly spread subset the feature-cache figures use, so the two share
    their cached features."""
    from toollmm.perf.cache_fig import cache_subset

    s = world.sizes
    return world.config(
        name,
        1,
        train={"micro_batch_size": s.stage1_micro_batch, "max_steps": 10**6},
        data={
            "train": [
                {"path": str(cache_subset(world, m)), "media_root": str(world.demo), "task": "x2t"}
                for m in ("image", "audio", "video")
            ],
            "max_length": s.max_length,
        },
    )


def stage2_signals(world: World, name: str) -> object:
    """Stage 2 (config/stage_2.yaml's trainable set and losses, dsconfig/stage_2.json) on the demo's three
    text->X files; caption targets embedded once by the tiny decoders' text encoders (``data.captions``)."""
    s = world.sizes
    return world.config(
        name,
        2,
        train={"micro_batch_size": s.stage1_micro_batch, "max_steps": 10**6},
        data={"train": [world.source("train", f"t2x_{m}", task="t2x") for m in ("image", "audio", "video")]},
    )


def input_proj_flops(model, batch) -> float:
    """``input_proj_train_flops`` of the batch's media vectors through ``model``'s input projection."""
    proj = model.input_proj
    kind = "linear" if isinstance(proj.net, torch.nn.Linear) else "mlp"
    vectors = sum(int(m.features.shape[0] * m.features.shape[1]) for m in batch.media.values() if len(m))
    return input_proj_train_flops(proj.in_dim, proj.hidden, proj.tokens_per_input, kind, vectors)


def stage1_batch_flops(shape: LlamaShape, model, batch) -> float:
    """Model FLOPs of one stage-1 step (``toollmm.perf.flops.stage1_flops``)."""
    if any(m.features is None for m in batch.media.values() if len(m)):
        raise ValueError(
            "stage-1 MFU counts cached features only; this batch carries pixels (encoder in the step)"
        )
    keep, _ = next_token_targets(batch.labels, _starts(batch))
    return stage1_flops(shape, sample_lengths(batch), int(keep.sum()), input_proj_flops(model, batch))


def signal_spans(model, batch) -> list[tuple]:
    """``(OutProjShape, span length, spans)`` per modality with real signal targets in the batch."""
    out = []
    for m, t in batch.signal_targets.items():
        k = int(t.positions.shape[0])
        if k:
            span = len(model.bundle.token_ids.signal[m])
            out.append((OutProjShape.of(model.output_proj[m]), span, k))
    return out


def stage2_batch_flops(shape: LlamaShape, model, batch) -> float:
    """Model FLOPs of one stage-2 step (``toollmm.perf.flops.stage2_flops``)."""
    keep, _ = next_token_targets(batch.labels, _starts(batch))
    return stage2_flops(shape, sample_lengths(batch), int(keep.sum()), signal_spans(model, batch))


def _starts(batch):
    return (batch.position_ids == 0) if batch.attention_mask.dim() == 4 else None


def mfu_stage(world: World, stage: int, profile_to=None) -> dict:
    """MFU of a stage-1 or stage-2 step, measured as ``mfu`` measures stage 3 (``s.stage_rounds`` rounds),
    plus where a step's time goes: ``time_split`` (forward, backward, gradient reduction, optimiser step
    of the median of ``s.steps_per_round`` separately timed steps, ``toollmm.perf.train_step.split_step``)
    and, with ``profile_to``, torch.profiler's top operators of two steps; the output projections' share
    of the forward time (every projection call: stage 1 runs all of them on zero spans, stage 2 those of
    the modalities a batch lacks) and, stage 2, of the step's counted FLOPs (real signal spans)."""
    s = world.sizes
    if stage == 1:
        cfg = stage1_captions(world, "mfu_stage1").config
    elif stage == 2:
        cfg = stage2_signals(world, "mfu_stage2").config
    else:
        raise ValueError(f"mfu_stage: stages 1 and 2 (stage 3 is `mfu`), got {stage}")
    init_distributed()
    model, counts, stream, _ = build_run(cfg, 0, 1)
    engine, dtype = make_engine(cfg, model, 10**6, 1)
    engine.train()  # as run_stage does
    count = stage1_batch_flops if stage == 1 else stage2_batch_flops
    it = cycle_batches(stream)
    out = _timed_steps(engine, it, dtype, lambda b: count(s.llm, model, b), s, s.stage_rounds)
    proj_clock = [0.0]
    for proj in model.output_proj.values():  # stage 1 runs them too, on zero spans, without gradients
        proj.forward = _Clocked(proj.forward, proj_clock, engine.device)
    splits, proj_share, proj_time = [], [], []
    for _ in range(s.steps_per_round):
        batch = next(it)
        proj_clock[0] = 0.0
        splits.append(split_step(engine, batch, dtype))
        proj_time.append(proj_clock[0] / splits[-1]["forward_s"])
        if stage == 2:
            total = stage2_batch_flops(s.llm, model, batch)
            proj = sum(k * output_proj_train_flops(p, n) for p, n, k in signal_spans(model, batch))
            proj_share.append(proj / total)
    mid = sorted(splits, key=lambda x: x["total_s"])[len(splits) // 2]
    out["time_split"] = {k: round(v, 4) for k, v in mid.items()}
    out["trainable"] = counts
    out["encoder_in_step"] = model.encoder is not None
    out["output_proj_forward_time_share"] = statistics.median(proj_time)
    if stage == 2:
        out["output_proj_flop_share"] = statistics.median(proj_share)
    if profile_to is not None:
        _profile(engine, it, dtype, profile_to, rows=15)
    return {**out, **_device_memory(engine.device)}


class _Clocked:
    """Wraps a callable and adds its wall time (device synchronised on both ends) to ``clock[0]``."""

    def __init__(self, fn, clock: list, device):
        self.fn, self.clock, self.device = fn, clock, device

    def __call__(self, *a, **kw):
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            _sync(self.device)
            self.clock[0] += time.perf_counter() - t0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _device_memory(device) -> dict:
    if torch.device(device).type != "cuda":
        return {"device": "cpu"}
    return {
        "device": torch.cuda.get_device_name(device),
        "max_memory_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
    }


def _profile(engine, it, dtype, out_path, rows: int = 30) -> None:
    """Two steps under torch.profiler; the operator table (self CPU time, top ``rows``) goes to
    ``out_path``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(2):
            train_step(engine, next(it), dtype)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20)
    out_path.write_text(table + "\n\nby input shape:\n" + shapes)


def trainer_tokens(world: World) -> dict:
    """Our whole stage-3 trainer (``run_stage``): median real tokens/s of its per-step metrics lines
    after the warm-up steps."""
    from toollmm.train.tracking import read_metrics

    s = world.sizes
    loaded = stage3_tools(world, "ours", s.trainer_steps + s.warmup)
    stage_dir = stage_dir_of(loaded.config)
    (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
    run_stage(loaded)
    rows = [r for r in read_metrics(stage_dir / "metrics.jsonl") if "tok_s" in r]
    steady = rows[s.warmup :]
    _cleanup(stage_dir)
    return {
        "real_tokens_per_s": statistics.median(r["tok_s"] for r in steady),
        "samples_per_s": statistics.median(r["samples_s"] for r in steady),
        "real_token_fraction": statistics.mean(r["real_token_fraction"] for r in steady),
        "steps": len(steady),
    }


def _cleanup(stage_dir) -> None:
    import shutil

    shutil.rmtree(stage_dir / "ckpt", ignore_errors=True)  # resume checkpoints: hundreds of MB each run


def real_tokens(world: World) -> dict:
    """Real tokens over batch cells for one epoch of the tool file: ours (packing, length grouping) and
    naive (one sample per row padded to the longest, no grouping), same micro-batch and max length."""
    from transformers import AutoTokenizer

    from toollmm.core.tokens import TokenContract
    from toollmm.data.pipeline import make_processor
    from toollmm.data.stream import TrainStream

    out = {}
    for name, data in (
        ("ours", {}),
        ("naive", {"packing": False, "group_by_length": False}),
    ):
        cfg = stage3_tools(world, f"tokens_{name}", 1, num_workers=0, **data).config
        tok = AutoTokenizer.from_pretrained(str(world.llm))
        TokenContract.from_config(cfg.model.tokens).add_to(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        stream = TrainStream.from_config(cfg, make_processor(cfg, tok), pad, rank=0, world_size=1)
        real = cells = 0
        for batch in stream:
            real += batch.real_tokens
            cells += batch.input_ids.numel()
        out[name] = real / cells
    out["stats"] = world.token_stats("tools")
    return out


def loader_vs_trainer(world: World) -> dict:
    """Samples/s of the stage-3 data pipeline alone (instruction records with media from the feature cache,
    plus tool records; its DataLoader workers) over samples/s of training on the same stream."""
    from toollmm.perf.cache_fig import subset

    s = world.sizes
    n = s.loader_batches
    half = s.micro_batch * (n + s.warmup + 1)  # records per file: both passes' batches, no repeats
    cfg = world.config(
        "loader",
        3,
        train={"micro_batch_size": s.micro_batch, "max_steps": 10**6},
        data={
            "train": [
                {"path": str(subset(world, name, half)), "media_root": str(world.demo), "task": "instruct"}
                for name in ("instruct", "tools")
            ],
            "max_length": s.max_length,
            "packing": True,
        },
    ).config
    init_distributed()
    t0 = time.perf_counter()
    model, _, stream, _ = build_run(cfg, 0, 1)
    prepass = time.perf_counter() - t0
    alone = _samples_per_s(stream, n, None)
    engine, dtype = make_engine(cfg, model, 10**6, 1)
    trained = _samples_per_s(stream, n, lambda b: train_step(engine, b, dtype))
    return {"loader_samples_per_s": alone, "train_samples_per_s": trained, "prepass_s": prepass}


def _samples_per_s(stream, n: int, step) -> float:
    """Samples per second over ``n`` batches after the first (which pays for starting the workers)."""
    it = iter(stream)
    first = next(it)
    if step is not None:
        step(first)
    samples, t0 = 0, time.perf_counter()
    for _ in range(n):
        batch = next(it)
        if step is not None:
            step(batch)
        samples += sum(len(r) for r in batch.sample_ids)
    return samples / (time.perf_counter() - t0)
