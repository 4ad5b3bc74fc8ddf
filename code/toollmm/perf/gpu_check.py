"""The sections of ``scripts/gpu_check.sh`` (each run in its own process by ``scripts/gpu_check.py``).

Every section takes the workspace and ``cpu`` (tiny sizes, fp32, gloo) and returns a JSON-able dict; the
keys are the same on CPU and GPU. ``gpu``: bf16 on CUDA at the real shapes (Vicuna-7B LLM with LoRA,
activation checkpointing and packed 8 x 2048 rows; ImageBind-huge), random weights, nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml

from toollmm.core.paths import REPO_ROOT
from toollmm.train.memory import VICUNA_7B

TINY_LLM = {
    "vocab_size": 1152,  # the demo tokenizer (1000) + our tokens
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
#: the invariants' model: small on both (the kernels, not the size, are under test), bigger heads on GPU
INVARIANT_LLM = {
    "cpu": TINY_LLM,
    "gpu": {**TINY_LLM, "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
            "num_key_value_heads": 8, "num_hidden_layers": 4},
}  # fmt: skip
INVARIANT_SIZES = {
    "cpu": {"rows": [[7, 12], [5, 9, 3]], "prefix": 9, "appends": [1, 2, 7]},
    "gpu": {"rows": [[130, 300, 64], [257, 199], [31, 500]], "prefix": 211, "appends": [1, 2, 7]},
}
TOL = {"cpu": 1e-4, "gpu": 1e-1}  # max |diff| of logits / hidden states: fp32 ~1e-6; bf16 ~1e-2
STAGE_SIZES = {
    "cpu": {"micro_batch": 2, "max_length": 160, "llm": TINY_LLM, "encoder": "tiny", "steps": 2},
    # the small corpus' samples are 60-140 tokens: 64 of them pack into 3-5 rows of 2048 (~6-10 k tokens)
    "gpu": {"micro_batch": 64, "max_length": 2048, "llm": VICUNA_7B, "encoder": "huge", "steps": 5},
}
ENCODER_BATCH = {"cpu": {"image": 2, "audio": 1, "video": 1}, "gpu": {"image": 64, "audio": 16, "video": 8}}
SMALL_COND = {m: (4, 32) for m in ("image", "video", "audio")}  # output projections: not under test
KERNELS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def mode(cpu: bool) -> str:
    return "cpu" if cpu else "gpu"


def device_dtype(cpu: bool) -> tuple[torch.device, torch.dtype]:
    if cpu:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --cpu for the tiny CPU check")
    return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16


# ------------------------------------------------------------------------------------------ workspace
def prepare(work: Path) -> dict:
    """The demo corpus (small) and its tokenizer in ``work``; built once, reused by every section."""
    demo = work / "demo"
    t0 = time.perf_counter()
    carried = REPO_ROOT / ".wheelhouse" / "demo"
    source = "existing"
    if not (demo / "summary.json").is_file():
        if (carried / "summary.json").is_file():  # written by --wheelhouse where PyAV can render video
            import shutil

            shutil.rmtree(demo, ignore_errors=True)
            shutil.copytree(carried, demo)
            source = "carried"
        else:  # rendering the corpus needs PyAV, which a bare GPU host may lack
            from toollmm.perf.world import demo_corpus

            demo_corpus(demo, small=True)
            source = "generated"
    return {"demo": str(demo), "source": source, "seconds": round(time.perf_counter() - t0, 2)}


def _tokenizer(work: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(work / "demo" / "tokenizer"))


def _llm(shape: dict, attn: str, device, dtype, seed: int = 0):
    """A random Llama of ``shape`` built directly on ``device`` in ``dtype`` (no file, no CPU init), loaded
    with ``attn`` the way ``toollmm.model.llm.load_causal_lm`` loads it (sdpa = our packed SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    impl = attn
    if attn == "sdpa":
        from toollmm.model.packed_attention import register

        impl = register()
    cfg = LlamaConfig(**shape, max_position_embeddings=4096)
    cfg._attn_implementation = impl
    default = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


def _toollmm(cfg, work: Path, shape: dict, attn: str, device, dtype, grad_ckpt: bool, condition_shapes):
    from toollmm.model.llm import prepare_llm
    from toollmm.model.toollmm_model import build_model

    hf = _llm(shape, attn, device, dtype)
    bundle = prepare_llm(hf, _tokenizer(work), cfg.model.tokens, cfg.model.llm.lora, grad_ckpt)
    return build_model(cfg.model, llm=bundle, condition_shapes=condition_shapes)


# ------------------------------------------------------------------------------------------- sections
def section_env(work: Path, cpu: bool) -> dict:
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    names = ("torch", "transformers", "peft", "deepspeed", "diffusers", "imagebind-unofficial", "flash-attn",
             "triton", "liger-kernel")  # fmt: skip
    out = {"versions": {n: ver(n) for n in names}, "cuda": torch.cuda.is_available()}
    out["flash_attn_importable"] = importlib.util.find_spec("flash_attn") is not None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
        }
    return out


def section_gemm(work: Path, cpu: bool) -> dict:
    from toollmm.perf.gemm import gemm_gflops

    device, dtype = device_dtype(cpu)
    shapes = ((512, 512, 512),) if cpu else ((8192, 8192, 8192), (4096, 4096, 4096))
    r = gemm_gflops(0.3 if cpu else 2.0, device=device, dtype=dtype, shapes=shapes)
    return {"dtype": str(dtype), "tflops": r["gflops"] / 1e3, "by_shape_gflops": r["by_shape"]}


def _kernel_available(attn: str, cpu: bool) -> str | None:
    import importlib.util

    if attn == "flash_attention_2" and (cpu or importlib.util.find_spec("flash_attn") is None):
        return "flash_attn not importable" if not cpu else "needs CUDA"
    if attn == "flex_attention" and cpu:
        return "GPU only here (compiled kernels)"
    return None


def accepted_kernels() -> tuple[str, ...]:
    """The ``model.llm.attn_implementation`` values the config accepts (read from its type)."""
    import typing

    from toollmm.core.config import LLMConfig

    return typing.get_args(typing.get_type_hints(LLMConfig)["attn_implementation"])


def verdict(results: dict, accepted: tuple[str, ...]) -> dict:
    """``failed`` (every kernel's failing case or error) and ``pass``: only kernels a config may name
    decide it; the others (flex_attention) are reported so a change to the accepted list can be judged."""
    failed = [
        f"{a}.{case}"
        for a in KERNELS
        for case, r in results.get(a, {}).items()
        if isinstance(r, dict) and r.get("pass") is False
    ]
    failed += [a for a in KERNELS if "error" in results.get(a, {})]
    return {
        "failed": failed,
        "accepted": list(accepted),
        "pass": not [f for f in failed if f.split(".")[0] in accepted],
    }


def section_invariants(work: Path, cpu: bool) -> dict:
    """``toollmm.infer.kernel_check.kernel_invariants`` (packed rows vs each sample alone; prefill + appends
    of 1, 2 and 7 tokens through the step model's cache vs one full forward) on a ToolLMM per kernel; each
    case's max abs difference against ``TOL``."""
    from toollmm.core.config import load_config
    from toollmm.infer.kernel_check import kernel_invariants

    m = mode(cpu)
    device, dtype = device_dtype(cpu)
    cfg = load_config(config_files=["config/presets/encoder_tiny.yaml"]).config
    shape = INVARIANT_LLM[m]
    out: dict = {"dtype": str(dtype), "tol_abs": TOL[m]}
    for attn in KERNELS:
        why = _kernel_available(attn, cpu)
        if why:
            out[attn] = {"skipped": why}
            continue
        try:
            model = _toollmm(cfg, work, shape, attn, device, dtype, False, SMALL_COND).to(device)
            diffs = kernel_invariants(model)
            out[attn] = {k: {"max_abs": v, "pass": bool(v <= TOL[m])} for k, v in diffs.items()}
            del model
        except Exception as e:  # a kernel that refuses a case is a result, not a crash
            out[attn] = {"error": f"{type(e).__name__}: {e}"[:500]}
        _emit_partial(out)  # a later kernel that hangs past the timeout leaves these results
    out["torch_varlen"] = {
        "skipped": "no transformers attn_implementation runs torch's varlen attention (packed sdpa and "
        "flash_attention_2 take the varlen path through position_ids / cu_seq_lens)"
    }
    out.update(verdict(out, accepted_kernels()))
    return out


def section_encoder(work: Path, cpu: bool) -> dict:
    """ImageBind (huge on GPU, tiny on CPU; random weights) encoding a batch of each modality."""
    from toollmm.core.config import load_config
    from toollmm.model.encoder import ImageBindEncoder, build_imagebind, model_kwargs

    m = mode(cpu)
    device, dtype = device_dtype(cpu)
    files = ["config/presets/encoder_tiny.yaml"] if cpu else []
    cfg = load_config(config_files=files, overrides=["model.encoder.checkpoint=null"]).config
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device itself (CPU init of 1.2 B parameters is slow)
        net = build_imagebind(model_kwargs(cfg.model))
    net.to(dtype=dtype)
    enc = ImageBindEncoder(
        net, output=cfg.model.encoder.output, preprocess=cfg.model.preprocess, identity="check"
    )
    out = {
        "preset": cfg.model.encoder.preset,
        "params": sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers()),
        "build_s": round(time.perf_counter() - t0, 2),
        "dtype": str(dtype),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for modality, n in ENCODER_BATCH[m].items():
        x = torch.randn(n, *enc.input_shape(modality), device=device)
        enc.encode(modality, x)  # warm-up
        _sync(device)
        t = time.perf_counter()
        y = enc.encode(modality, x)
        _sync(device)
        dt = time.perf_counter() - t
        out[modality] = {"batch": n, "seconds": round(dt, 4), "media_per_s": round(n / dt, 2),
                         "finite": bool(torch.isfinite(y).all()), "shape": list(y.shape)}  # fmt: skip
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def VIDEO_LEFT_OUT() -> tuple[str, ...]:  # noqa: N802 - reads like the constant it stands for
    """Video files need PyAV; a host without it (the wheelhouse leaves its 36 MB out) skips them in
    stage 1 and the instruction file (a third of it has videos) in stage 3; the encoder section still
    encodes video-shaped input."""
    import importlib.util

    return () if importlib.util.find_spec("av") else ("x2t_video", "instruct")


def stage_config(work: Path, stage: int, cpu: bool):
    """The stage's config over the demo corpus at the check's sizes (packed rows, LoRA, checkpointing)."""
    from toollmm.core.config import load_config

    m = mode(cpu)
    s = STAGE_SIZES[m]
    demo = work / "demo"

    def src(name):
        return {"path": str(demo / "train" / f"{name}.jsonl"), "media_root": str(demo)}

    data = {
        1: [src(n) for n in ("x2t_image", "x2t_audio", "x2t_video") if n not in VIDEO_LEFT_OUT()],
        2: [src(n) for n in ("t2x_image", "t2x_audio", "t2x_video")],
        3: [src(n) for n in ("tools", "instruct", "x2t_image", "t2x_image") if n not in VIDEO_LEFT_OUT()],
    }[stage]
    tree = {
        "run": {"name": f"gpu_check_{m}", "output_root": str(work / "runs")},
        "model": {
            "encoder": {"checkpoint": None},
            "feature_cache": {"dir": str(work / f"features_{m}")},
            "llm": {"gradient_checkpointing": True, "dtype": "auto"},
            "decoders": {k: {"path": str(work / "decoders" / d)} for k, d in
                         (("image", "tiny-sd"), ("video", "tiny-t2v"), ("audio", "tiny-audioldm"))},
        },  # fmt: skip
        "data": {
            "train": data,
            "heldout": [],
            "max_length": s["max_length"],
            "packing": True,
            "num_workers": 0,
            "captions": str(work / f"captions_{m}"),
            "overlong": "skip",
        },
        "train": {"init_from": None, "micro_batch_size": s["micro_batch"], "grad_accum": 1, "max_steps": 3,
                  "eval_every": 0, "save_every": 0, "log_every": 1},
        "logging": {"wandb_mode": "disabled", "level": "WARNING"},
    }  # fmt: skip
    path = work / "configs" / f"stage_{stage}_{m}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    files = ["config/presets/encoder_tiny.yaml", str(path)] if cpu else [str(path)]
    return load_config(stage=stage, config_files=files)


def section_stage(work: Path, cpu: bool, stage: int) -> dict:
    """Optimiser steps of ``stage`` (the median after one warm-up step is reported) through the real training path: the
    feature pre-pass (``build_run``), the DeepSpeed engine (``make_engine``, world 1, NCCL on GPU) and
    ``optimiser_step``; peak memory against ``toollmm.train.memory``'s estimate; tokens/s and MFU."""
    from toollmm.core.paths import ensure_torch_extensions_dir
    from toollmm.model.tiny_decoders import build_tiny_decoders
    from toollmm.perf.flops import LlamaShape
    from toollmm.perf.train_figs import batch_flops
    from toollmm.perf.train_step import train_step
    from toollmm.train.build import build_run
    from toollmm.train.ds import init_distributed, load_ds_json
    from toollmm.train.loop import batches, make_engine
    from toollmm.train.memory import per_gpu_bytes, stage_sizes

    m = mode(cpu)
    s = STAGE_SIZES[m]
    device, dtype = device_dtype(cpu)
    if not (work / "decoders" / "tiny-sd" / "model_index.json").is_file():
        build_tiny_decoders(work / "decoders")
    loaded = stage_config(work, stage, cpu)
    cfg = loaded.config
    ensure_torch_extensions_dir()
    rank, _, world = init_distributed()
    out: dict = {"world": world, "backend": torch.distributed.get_backend(), "dtype": str(dtype)}
    out["left_out"] = [
        n for n in VIDEO_LEFT_OUT() if n in {1: ("x2t_video",), 3: ("instruct",)}.get(stage, ())
    ]
    t0 = time.perf_counter()
    hf_shape = s["llm"]
    llm = _prepared_llm(cfg, work, hf_shape, device, dtype)
    report: dict = {}
    model, counts, stream, _ = build_run(cfg, rank, world, report, llm=llm)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["features"] = report.get("features")
    out["trainable"] = counts
    if device.type == "cuda":  # training's peak from here (the pre-pass encoder is freed by now)
        torch.cuda.reset_peak_memory_stats()
    engine, dtype = make_engine(cfg, model, 3, world)
    src = batches(stream)
    shape = LlamaShape.of(type("C", (), hf_shape))
    steps = []
    for _ in range(s["steps"]):
        batch = next(src)
        _sync(device)
        t = time.perf_counter()
        window = train_step(engine, batch, dtype)
        _sync(device)
        dt = time.perf_counter() - t
        flops = batch_flops(shape, batch)
        steps.append({"seconds": round(dt, 4), "real_tokens": batch.real_tokens, "cells": batch.input_ids.numel(),
                      "rows": list(batch.input_ids.shape), "loss": float(window.mean("loss")),
                      "model_tflops": flops / 1e12})  # fmt: skip
    src.close()
    after_warmup = sorted(steps[1:], key=lambda st: st["seconds"])  # the first step builds kernels
    timed = after_warmup[len(after_warmup) // 2]  # the median step
    out["steps"] = steps
    out["tokens_per_s"] = timed["real_tokens"] / timed["seconds"]
    out["model_tflop_per_s"] = timed["model_tflops"] / timed["seconds"]
    out["loss_finite"] = all(map(lambda x: x == x and abs(x) != float("inf"), (st["loss"] for st in steps)))
    zero = int(load_ds_json(cfg.train.deepspeed_config).get("zero_optimization", {}).get("stage", 2))
    # packing puts the micro-batch's samples into fewer rows than samples: estimate for the rows seen
    sizes = dataclasses.replace(stage_sizes(hf_shape, cfg), micro_batch=max(st["rows"][0] for st in steps))
    est = per_gpu_bytes(sizes, max(2, zero), world)
    out["memory_estimate_gib"] = round(sum(est.values()) / 2**30, 2)
    out["memory_estimate_terms_gib"] = {k: round(v / 2**30, 2) for k, v in est.items()}
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    return out


def _prepared_llm(cfg, work: Path, shape: dict, device, dtype):
    from toollmm.model.llm import prepare_llm

    hf = _llm(shape, cfg.model.llm.attn_implementation, device, dtype)
    return prepare_llm(
        hf,
        _tokenizer(work),
        cfg.model.tokens,
        cfg.model.llm.lora,
        cfg.model.llm.gradient_checkpointing,
        fused_projections=cfg.model.llm.fused_projections,  # the stage sections time the path users run
    )


# ------------------------------------------------------------------------- model.llm.fused_kernels
#: the numerics' bar: the fused kernels' error against an fp32 reference may be at most FUSED_FACTOR x the
#: unfused bf16 path's own error against it, plus one bf16 unit roundoff (2^-8) relative
FUSED_FACTOR, FUSED_FLOOR = 2.0, 2.0**-8
#: per variant, after one warm-up step each (Triton compiles liger's kernels there); GPU_CHECK_FUSED_STEPS
#: overrides it for a longer A/B (`GPU_CHECK_FUSED_STEPS=8 bash scripts/gpu_check.sh --only env,gemm,fused_kernels`)
FUSED_TIMED_STEPS = int(os.environ.get("GPU_CHECK_FUSED_STEPS", "3"))
#: the section's sizes and dtypes (the functions below take them as arguments so that they can be dry-run)
FUSED_SIZES = {"numerics_llm": INVARIANT_LLM["gpu"], "speed_llm": VICUNA_7B, "dtype": torch.bfloat16,
               "ref_dtype": torch.float32}  # fmt: skip


def section_fused_kernels(work: Path, cpu: bool) -> dict:
    """``model.llm.fused_kernels`` (liger-kernel) on vs off, both with the fused projections and activation
    checkpointing, through the real stage-3 path (``build_run``, the DeepSpeed engine, ``train_step``):

    - ``numerics``: a small Llama (``INVARIANT_LLM["gpu"]``), LoRA dropout 0 so that nothing random differs,
      LoRA B and the token rows moved off their initial values: the loss terms and every trainable
      gradient (per part) of one stage-3 batch, bf16 with the kernels (``on``) and without (``off``), each
      against the same model in fp32 without them (``ref``). ``pass``: for every loss term and part,
      ``rel(on, ref) <= FUSED_FACTOR * rel(off, ref) + FUSED_FLOOR`` (the kernels add no more error than
      bf16 itself makes); ``rel(on, off)`` and the largest element difference are reported as well;
    - ``speed``: the Vicuna-7B shape (as ``stage_3``): one engine, the same batches for both variants, a
      warm-up step each, then ``FUSED_TIMED_STEPS`` steps alternating off / on; median tokens/s, model
      TFLOP/s (MFU is added by the driver against the ``gemm`` section) and the peak of
      ``torch.cuda.max_memory_allocated`` over each variant's steps.

    Skipped (recorded, not failed) on a CPU run; on a GPU host without liger-kernel it fails."""
    from toollmm.model.kernels import unavailable

    if cpu or not torch.cuda.is_available():
        where = "a --cpu run" if cpu else "torch sees no CUDA device"
        return {"skipped": f"no CUDA ({where}): model.llm.fused_kernels {unavailable(cuda=False)}"}
    why = unavailable(cuda=True)
    if why:
        raise RuntimeError(
            f"model.llm.fused_kernels {why} (bash scripts/gpu_check.sh --wheelhouse carries it)"
        )
    from importlib.metadata import version

    from toollmm.core.paths import ensure_torch_extensions_dir
    from toollmm.model.tiny_decoders import build_tiny_decoders
    from toollmm.train.ds import init_distributed

    if not (work / "decoders" / "tiny-sd" / "model_index.json").is_file():
        build_tiny_decoders(work / "decoders")
    ensure_torch_extensions_dir()
    rank, _, world = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device())
    out: dict = {"liger_kernel": version("liger-kernel"), "factor": FUSED_FACTOR, "floor": FUSED_FLOOR}
    out["numerics"] = _fused_numerics(work, rank, world, device, False, FUSED_SIZES)
    out["pass"] = out["numerics"]["pass"]
    _emit_partial(out)
    out["speed"] = _fused_speed(work, rank, world, device, False, FUSED_SIZES)
    return out


def _fused_bundle(cfg, work: Path, shape: dict, device, dtype, on: bool):
    from toollmm.model.llm import prepare_llm

    hf = _llm(shape, cfg.model.llm.attn_implementation, device, dtype)
    return prepare_llm(
        hf, _tokenizer(work), cfg.model.tokens, cfg.model.llm.lora, cfg.model.llm.gradient_checkpointing,
        fused_projections=True, fused_kernels=on,
    )  # fmt: skip


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def _fused_numerics(work: Path, rank: int, world: int, device, cpu: bool, sizes: dict) -> dict:
    from toollmm.model.kernels import has_fused_kernels
    from toollmm.model.losses import next_token_targets
    from toollmm.model.toollmm_model import build_model
    from toollmm.train.build import build_run
    from toollmm.train.loop import batches

    cfg = stage_config(work, 3, cpu).config
    cfg.model.llm.lora.dropout = 0.0  # no random masks: the three runs differ by their kernels only
    shape = sizes["numerics_llm"]
    off, _, stream, _ = build_run(
        cfg, rank, world, None, llm=_fused_bundle(cfg, work, shape, device, sizes["dtype"], False)
    )
    src = batches(stream)
    batch = _covering_batch(src, 8)
    src.close()
    packed = batch.attention_mask.dim() == 4 and batch.position_ids is not None
    _, targets = next_token_targets(batch.labels, (batch.position_ids == 0) if packed else None)
    models = {"off": off.to(device)}
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(1)
        for n, p in off.named_parameters():
            if "lora_B" in n:  # peft starts B at 0: the LoRA A gradients would be 0 and compare nothing
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
        for r in off.bundle.rows.values():  # trained rows differ from the frozen matrices' copies
            for p in r.rows.values():
                p.add_(torch.randn(p.shape, generator=g, device=device).to(p.dtype) * 0.02)
    for name, dtype, on in (("on", sizes["dtype"], True), ("ref", sizes["ref_dtype"], False)):
        llm = _fused_bundle(cfg, work, shape, device, dtype, on)
        m = build_model(cfg.model, llm=llm, loss_weights=cfg.train.loss_weights)
        m.to(device).load_state_dict(off.state_dict())
        models[name] = m
    assert has_fused_kernels(models["on"].llm) and not has_fused_kernels(off.llm)
    losses, grads = {}, {}
    for name, m in models.items():
        m.trainable_parameters(cfg.train.trainable)
        m.train()
        part_of = {
            n: part for part, pairs in m.named_parts().items() if part in m.trainable_names for n, _ in pairs
        }
        params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        res = m(batch.to(device, next(m.parameters()).dtype))
        got = torch.autograd.grad(res["loss"], [p for _, p in params], allow_unused=True)
        losses[name] = {k: v.detach().double() for k, v in res.items()}
        by_part: dict = {}
        for (n, _), gr in zip(params, got):
            if gr is not None:
                by_part.setdefault(part_of.get(n, "other"), []).append(gr.detach().double().flatten())
        grads[name] = {k: torch.cat(v) for k, v in by_part.items()}
    cmp: dict = {}
    for kind, values in (("loss", losses), ("grad", grads)):
        for k in values["ref"]:
            on, off_, ref = values["on"][k], values["off"][k], values["ref"][k]
            r = {"rel_on_ref": _rel(on, ref), "rel_off_ref": _rel(off_, ref), "rel_on_off": _rel(on, off_),
                 "max_abs_on_off": float((on - off_).abs().max()), "max_abs_off": float(off_.abs().max())}  # fmt: skip
            r["pass"] = bool(r["rel_on_ref"] <= FUSED_FACTOR * r["rel_off_ref"] + FUSED_FLOOR)
            cmp[f"{kind}.{k}"] = r
    worst = max(cmp.values(), key=lambda r: r["rel_on_off"])
    # the on model does take liger's fused loss (a CUDA, non-partitioned head) and kernels in its layers
    fused_loss = models["on"]._fused_loss_head() is not None
    return {
        "shape": shape,
        "dtype": f"{sizes['dtype']} (ref {sizes['ref_dtype']})",
        "real_tokens": batch.real_tokens,
        "supervised_targets": int(targets.numel()),
        "media": {m: len(v) for m, v in batch.media.items()},
        "signal_spans": {m: int(v.positions.shape[0]) for m, v in batch.signal_targets.items()},
        "compare": cmp,
        "max_rel_on_off": worst["rel_on_off"],
        "fused_loss": fused_loss,
        "failed": [k for k, r in cmp.items() if not r["pass"]] + ([] if fused_loss else ["fused_loss"]),
        "pass": fused_loss and all(r["pass"] for r in cmp.values()),
    }


def _covering_batch(src, tries: int):
    """The first of up to ``tries`` batches with media and signal spans (so that the input and output
    projections' gradients are compared too), else the one with the most of them."""

    def coverage(b) -> tuple[int, int]:
        return (sum(len(v) for v in b.media.values()),
                sum(int(v.positions.shape[0]) for v in b.signal_targets.values()))  # fmt: skip

    best = None
    for _ in range(tries):
        b = next(src)
        if min(coverage(b)) > 0:
            return b
        if best is None or coverage(b) > coverage(best):
            best = b
    return best


def _fused_speed(work: Path, rank: int, world: int, device, cpu: bool, sizes: dict) -> dict:
    from toollmm.model.fused import fuse_llama_layers, unfuse
    from toollmm.model.kernels import disable_fused_kernels, enable_fused_kernels
    from toollmm.perf.flops import LlamaShape
    from toollmm.perf.train_figs import batch_flops
    from toollmm.perf.train_step import train_step
    from toollmm.train.build import build_run
    from toollmm.train.loop import batches, make_engine

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    cfg = stage_config(work, 3, cpu).config
    t0 = time.perf_counter()
    llm = _fused_bundle(cfg, work, sizes["speed_llm"], device, sizes["dtype"], False)
    model, _, stream, _ = build_run(cfg, rank, world, None, llm=llm)
    engine, dtype = make_engine(cfg, model, 3 * (FUSED_TIMED_STEPS + 1), world)
    src = batches(stream)
    data = [next(src) for _ in range(FUSED_TIMED_STEPS + 1)]
    src.close()
    out: dict = {"llm": sizes["speed_llm"], "build_s": round(time.perf_counter() - t0, 2)}
    shape = LlamaShape.of(type("C", (), sizes["speed_llm"]))
    steps: dict = {"unfused": [], "off": [], "on": []}

    def step(variant: str, batch) -> None:
        # the same engine and weights: "unfused" = transformers' + peft's own forward (fused_projections off),
        # "off" = fused projections (the default), "on" = fused projections + liger's kernels and loss
        if variant == "unfused":
            disable_fused_kernels(model.llm)
            unfuse(model.llm)
        else:
            fuse_llama_layers(model.llm, shared_dropout=cfg.model.llm.lora.shared_dropout)
            if variant == "on":
                out["modules"] = enable_fused_kernels(model.llm)
            else:
                disable_fused_kernels(model.llm)
        model.bundle.fused_kernels = variant == "on"  # the loss
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        window = train_step(engine, batch, dtype)
        _sync(device)
        dt = time.perf_counter() - t
        peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None
        steps[variant].append({"seconds": round(dt, 4), "real_tokens": batch.real_tokens,
                               "rows": list(batch.input_ids.shape), "loss": float(window.mean("loss")),
                               "model_tflops": batch_flops(shape, batch) / 1e12,
                               "peak_gib": peak})  # fmt: skip

    for variant in steps:  # a warm-up each (liger's Triton kernels compile in the first "on" step)
        step(variant, data[0])
    for batch in data[1:]:  # alternating, on the same batches: drift hits all alike
        for variant in steps:
            step(variant, batch)
    for variant in steps:
        timed = steps[variant][1:]  # the batches differ in size: rates over all timed steps, not one step's
        seconds = sum(st["seconds"] for st in timed)
        out[variant] = {
            "steps": steps[variant],
            "tokens_per_s": sum(st["real_tokens"] for st in timed) / seconds,
            "model_tflop_per_s": sum(st["model_tflops"] for st in timed) / seconds,
            "peak_gib": max(st["peak_gib"] for st in steps[variant]) if cuda else None,
            "loss_finite": all(math.isfinite(st["loss"]) for st in steps[variant]),
        }
    out["tokens_per_s_ratio"] = out["on"]["tokens_per_s"] / out["off"]["tokens_per_s"]
    out["fused_projections_tokens_per_s_ratio"] = out["off"]["tokens_per_s"] / out["unfused"]["tokens_per_s"]
    out["peak_gib_saved"] = round(out["off"]["peak_gib"] - out["on"]["peak_gib"], 2) if cuda else None
    return out


SECTIONS = {
    "env": section_env,
    "gemm": section_gemm,
    "invariants": section_invariants,
    "encoder": section_encoder,
    "stage_1": lambda w, c: section_stage(w, c, 1),
    "stage_2": lambda w, c: section_stage(w, c, 2),
    "stage_3": lambda w, c: section_stage(w, c, 3),
    "fused_kernels": section_fused_kernels,
}


def build_ops(work: Path, cpu: bool) -> dict:
    """Run by the driver before the sections (not one of them): builds DeepSpeed's CPU all-reduce op into
    ``TORCH_EXTENSIONS_DIR`` on a CPU host, so that no timed section pays the build or, killed by its
    timeout in the middle of it, leaves the build's lock behind for the next section to wait on."""
    from toollmm.core.paths import build_cpu_comm_op

    seconds = build_cpu_comm_op()
    return {"cpu_comm_op_s": None if seconds is None else round(seconds, 1)}


#: what the driver runs before ``SECTIONS`` (recorded beside them, not as a section)
PRE_STEPS = {"ops": build_ops}


def imported_distributions() -> list[str]:
    """The installed distributions this process imported (what a GPU host without our venv must have)."""
    import sys
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    top = {name.split(".")[0] for name in list(sys.modules)}
    return sorted({d for t in top for d in owners.get(t, [])})


_PARTIAL: list = [None]


def _emit_partial(result: dict) -> None:
    """Write the section's results so far next to its result file (``<result>.partial``)."""
    if _PARTIAL[0] is not None:
        _PARTIAL[0].write_text(json.dumps(result, indent=1, default=str))


def run_section(name: str, work: Path, cpu: bool, out: Path) -> None:
    """Run one section and write its JSON to ``out`` (the driver reads it back)."""
    os.chdir(REPO_ROOT)
    _PARTIAL[0] = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    result = {**PRE_STEPS, **SECTIONS}[name](work, cpu)
    result["section_s"] = round(time.perf_counter() - t0, 2)
    result["distributions"] = imported_distributions()
    out.write_text(json.dumps(result, indent=1, default=str))
