"""The sections of ``scripts/gpu_check.sh`` (each run in its own process by ``scripts/gpu_check.py``).

Every section takes the workspace and ``cpu`` (tiny sizes, fp32, gloo) and returns a JSON-able dict; the
keys are the same on CPU and GPU. ``gpu``: bf16 on CUDA at the real shapes (Vicuna-7B LLM with LoRA,
activation checkpointing and packed 8 x 2048 rows; ImageBind-huge), random weights, nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import json
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

    names = ("torch", "transformers", "peft", "deepspeed", "diffusers", "imagebind-unofficial", "flash-attn")
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
        hf, _tokenizer(work), cfg.model.tokens, cfg.model.llm.lora, cfg.model.llm.gradient_checkpointing
    )


SECTIONS = {
    "env": section_env,
    "gemm": section_gemm,
    "invariants": section_invariants,
    "encoder": section_encoder,
    "stage_1": lambda w, c: section_stage(w, c, 1),
    "stage_2": lambda w, c: section_stage(w, c, 2),
    "stage_3": lambda w, c: section_stage(w, c, 3),
}


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
    result = SECTIONS[name](work, cpu)
    result["section_s"] = round(time.perf_counter() - t0, 2)
    result["distributions"] = imported_distributions()
    out.write_text(json.dumps(result, indent=1, default=str))
