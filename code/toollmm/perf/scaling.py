"""docs/scaling.md: projected wall time and GPU memory of the real three-stage run, from the configs and
bench.json, every assumption in one table (``ASSUMPTIONS``) that the page prints.

Time of a stage = its model FLOPs (``toollmm.perf.flops``, with activation recomputation when
``model.llm.gradient_checkpointing``) / (GPUs x dense bf16 peak x MFU) + ZeRO-3's parameter traffic that
does not overlap compute + the one-time ImageBind-huge pre-pass over the stage's media (feature cache).
The MFU is calibrated on the anchors' own published hours (LLaVA-1.5 7B on 8x A100), unless bench.json
holds a GPU measurement of the Vicuna-7B-shaped step (``bash scripts/bench.sh --sizes vicuna7b``).
Memory per GPU is ``memory_per_gpu_gb`` (the one place this module does memory math).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from toollmm.core.config import EncoderDims, PreprocessConfig, load_config
from toollmm.model.param_count import input_proj_count, lora_count, output_proj_count, token_rows_count
from toollmm.perf.flops import VICUNA_7B, LlamaShape, encoder_flops_per_input, train_flops


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense, no sparsity
    memory_gb: float
    allgather_gbps: float  # NCCL all-gather bus bandwidth within one 8-GPU node


GPUS = (GPU("8x A100-80G", 312.0, 80.0, 230.0), GPU("8x H100-80G", 989.0, 80.0, 370.0))
N_GPUS = 8

#: (stage, data set, samples, tokens per sample, supervised tokens per sample, media per sample, media kind)
RUNS = (
    (1, "NExT-GPT stage 1 (CC3M + WebVid + AudioCaps captions)", 40_000, 80, 16, 1.0, "mixed"),
    (2, "NExT-GPT stage 2 (caption -> signal tokens)", 180_000, 90, 40, 0.0, "none"),
    (3, "NExT-GPT stage 3 (instructions + tool use)", 250_000, 420, 160, 0.6, "mixed"),
    (1, "LLaVA-1.5 pretrain set (558k captions)", 558_000, 80, 16, 1.0, "image"),
    (3, "LLaVA-1.5 instruction mix (665k)", 665_000, 420, 160, 0.9, "image"),
)
#: published wall time of the anchors' runs on 8x A100 (hours); NExT-GPT published none
ANCHOR_HOURS = {"LLaVA-1.5 pretrain set (558k captions)": 3.5, "LLaVA-1.5 instruction mix (665k)": 10.0}
#: LLaVA-1.5 7B: 576 CLIP tokens per image + text; pretrain trains the projector only (backward through the
#: frozen LLM: 4N), finetune trains the whole LLM (6N); no recomputation counted
LLAVA = {"pretrain": (558_000, 576 + 60, 20, 4.0), "finetune": (665_000, 576 + 420, 160, 6.0)}
ASSUMPTIONS = [
    "LLM: Vicuna-7B v1.5 (Llama-2-7B shape, 6.74 B parameters), bf16, LoRA r 32 on q/k/v/o; trainable sets,"
    " micro-batches and DeepSpeed ZeRO stages from config/stage_{1,2,3}.yaml and dsconfig/ (ZeRO-3 rows use"
    " dsconfig/zero3.json).",
    "Encoder: ImageBind-huge, pooled output (1 token per medium), features cached: one forward per medium"
    " in a pre-pass (video = 5 clips x 3 crops; audio = 3 clips); no encoder weights in the training engine.",
    "Tokens per sample (Llama tokenizer, Vicuna v1.1 template with its ~40-token system prompt): captions"
    " 80 (16 supervised); caption -> signal 90 (40 supervised, signal tokens included); instructions and"
    " tool use 420 (160 supervised). Media per sample and kinds as listed per row ('mixed' = thirds of"
    " image / video / audio).",
    "Model FLOPs per token: 4 x non-embedding parameters (frozen weights need input gradients only) + 2 x"
    " the same again when gradient checkpointing recomputes the forward; LM head only where the loss reads"
    " logits (supervised positions); causal attention inside each sample (toollmm.perf.flops).",
    "MFU: calibrated so the LLaVA-1.5 7B anchors' published hours come out exactly (their FLOPs with 576"
    " image tokens per sample), the mean of the pretrain and finetune calibrations; the same MFU on H100"
    " (conservative: H100 usually reaches a similar or higher fraction of its peak).",
    "ZeRO-3: each micro-step all-gathers the bf16 parameters twice (forward, backward; three times with"
    " recomputation) over NVLink at the listed bus bandwidth; half of that traffic overlaps compute.",
    "Memory per GPU: bf16 weights (ZeRO-3: 1/8 + two gathered layers), trainable parameters' fp32 master +"
    " Adam moments + bf16 gradients (partitioned 1/8 under ZeRO-2 and 3), activations of one micro-batch"
    " (checkpointed: one hidden state per layer + one layer's working set, 34 x tokens x hidden bytes),"
    " fp32 logits at supervised positions, and 3 GB for the CUDA context, NCCL buffers and fragmentation.",
]


def stage_config(stage: int, zero3: bool):
    over = ["train.deepspeed_config=dsconfig/zero3.json"] if zero3 else []
    return load_config(stage=stage, overrides=over).config


def trainable_params(cfg) -> int:
    """Closed forms of ``toollmm.model.param_count`` for the stage's trainable set at Vicuna-7B's shape."""
    h, v = VICUNA_7B, cfg.model
    conds = {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)}  # SD 1.5, ZeroScope, AudioLDM
    parts = {
        "lora": lora_count(h.hidden, h.layers, h.heads, h.kv_heads, h.intermediate, v.llm.lora.r,
                           v.llm.lora.target_modules),
        "input_proj": input_proj_count(v.encoder.dims.out_embed_dim, h.hidden, v.input_proj.type,
                                       v.input_proj.tokens_per_input),
        "token_rows.signal": token_rows_count(h.hidden, 4 + 24 + 8, tied=False),
        "token_rows.tool": token_rows_count(h.hidden, 4, tied=False),
    }  # fmt: skip
    for m, (q, c) in conds.items():
        p = v.output_proj[m]
        parts[f"output_proj.{m}"] = output_proj_count(
            h.hidden, q, c, p.d_model, p.dim_feedforward, p.num_encoder_layers, p.num_decoder_layers
        )
    return sum(parts[n] for n in cfg.train.trainable if n in parts)


def memory_per_gpu_gb(
    shape: LlamaShape, trainable: int, zero: int, micro_batch: int, tokens: int, supervised: int,
    checkpointing: bool, gpus: int = N_GPUS,
) -> float:  # fmt: skip
    """Per-GPU memory (GB) of a LoRA-style step: see ASSUMPTIONS (the memory item)."""
    weights = shape.total_params * 2.0
    if zero == 3:
        per_layer = shape.body_params / shape.layers * 2.0
        weights = weights / gpus + 2 * per_layer
    states = trainable * (4 + 4 + 4) / gpus + trainable * 2.0 / (gpus if zero >= 2 else 1)
    t = micro_batch * tokens
    if checkpointing:
        acts = shape.layers * t * shape.hidden * 2.0 + 34.0 * t * shape.hidden
    else:
        acts = shape.layers * 34.0 * t * shape.hidden
    logits = micro_batch * supervised * shape.vocab * 4.0 * 2  # fp32 logits and their gradient
    return (weights + states + acts + logits) / 1e9 + 3.0


def calibrated_mfu() -> float:
    """The MFU at which LLaVA-1.5 7B's published hours on 8x A100 come out (mean of both stages)."""
    gpu = GPUS[0]
    out = []
    for (samples, tokens, sup, factor), hours in zip(LLAVA.values(), ANCHOR_HOURS.values()):
        flops = samples * (factor * VICUNA_7B.body_params * tokens + factor * VICUNA_7B.head_params * sup)
        out.append(flops / (hours * 3600 * N_GPUS * gpu.bf16_tflops * 1e12))
    return sum(out) / len(out)


def encoder_hours(samples: int, media: float, kind: str, gpu: GPU, mfu: float) -> float:
    pre, huge = PreprocessConfig(), EncoderDims()
    kinds = ("image", "video", "audio") if kind == "mixed" else ((kind,) if kind != "none" else ())
    if not kinds:
        return 0.0
    per = sum(encoder_flops_per_input(huge, pre, k) for k in kinds) / len(kinds)
    return samples * media * per / (N_GPUS * gpu.bf16_tflops * 1e12 * mfu) / 3600


def project(gpu: GPU, zero3: bool, run, mfu: float) -> dict:
    stage, name, samples, tokens, sup, media, kind = run
    cfg = stage_config(stage, zero3)
    ckpt = cfg.model.llm.gradient_checkpointing
    factor = 6.0 if ckpt else 4.0
    per_sample = train_flops(VICUNA_7B, [tokens], sup) * factor / 4.0
    compute_s = samples * per_sample / (N_GPUS * gpu.bf16_tflops * 1e12 * mfu)
    mb = cfg.train.micro_batch_size
    comm_s = 0.0
    if zero3:
        steps = samples / (mb * N_GPUS)
        gathers = 3 if ckpt else 2
        per_step = gathers * VICUNA_7B.total_params * 2.0 * (N_GPUS - 1) / N_GPUS / (gpu.allgather_gbps * 1e9)
        comm_s = 0.5 * steps * per_step
    enc_h = encoder_hours(samples, media, kind, gpu, mfu)
    mem = memory_per_gpu_gb(VICUNA_7B, trainable_params(cfg), 3 if zero3 else 2, mb, tokens, sup, ckpt)
    return {"hours": (compute_s + comm_s) / 3600 + enc_h, "encoder_h": enc_h, "memory_gb": mem, "mb": mb}


def _mfu_source(bench: dict | None) -> tuple[dict, str]:
    gpu = (bench or {}).get("mfu_gpu")
    llm = ((bench or {}).get("sizes") or {}).get("llm") or {}
    if gpu and llm.get("hidden") == VICUNA_7B.hidden and llm.get("layers") == VICUNA_7B.layers:
        dev = bench["machine"].get("device", "GPU")
        return {g.name: gpu for g in GPUS}, f"measured on {dev} by scripts/bench.sh --sizes vicuna7b"
    mfu = calibrated_mfu()
    return {g.name: mfu for g in GPUS}, "calibrated on LLaVA-1.5 7B's published hours on 8x A100"


def render(bench: dict | None) -> str:
    mfus, source = _mfu_source(bench)
    head = (
        "| run | samples | "
        + " | ".join(f"{g.name} ZeRO-{z}: h / GB per GPU" for g in GPUS for z in (2, 3))
        + " | published (8x A100) |"
    )
    lines = [
        "# Scaling: the real three-stage run on 8 GPUs",
        "",
        "Generated by `python code/bench.py scaling` from config/, dsconfig/ and "
        "outputs/bench/bench.json; do not edit by hand. Projections, not measurements: the assumptions "
        "below are every number they rest on.",
        "",
        f"MFU used: {', '.join(f'{k} {v:.2f}' for k, v in mfus.items())} ({source}).",
        "",
        head,
        "|" + "---|" * (3 + 2 * len(GPUS)),
    ]
    for run in RUNS:
        cells = []
        for g in GPUS:
            for z3 in (False, True):
                p = project(g, z3, run, mfus[g.name])
                cells.append(f"{_hours(p['hours'])} / {p['memory_gb']:.0f} GB")
        pub = ANCHOR_HOURS.get(run[1])
        note = (f"{pub} h (LLaVA-1.5 7B, 576 image tokens per sample)" if pub
                else "not published (NExT-GPT #13, #17, #64)")  # fmt: skip
        lines.append(f"| stage {run[0]}: {run[1]} | {run[2]:,} | " + " | ".join(cells) + f" | {note} |")
    lines += ["", "## Assumptions", ""] + [f"- {a}" for a in ASSUMPTIONS]
    lines += ["", "## From this machine's benchmark", ""] + _bench_lines(bench)
    lines += [
        "",
        "## Checking the projection on a GPU host",
        "",
        "`bash scripts/bench.sh --sizes vicuna7b` runs the same figures with the Vicuna-7B shape (random "
        "weights from its config, nothing downloaded), bf16 as dsconfig/ asks, and records tokens/s per GPU "
        "and `torch.cuda.max_memory_allocated`; re-running `python code/bench.py scaling` then uses its "
        "measured MFU instead of the calibrated one.",
        "",
    ]
    return "\n".join(lines)


def _bench_lines(bench: dict | None) -> list[str]:
    if not bench:
        return ["No bench.json yet: run `bash scripts/bench.sh`."]
    m = bench.get("machine", {})
    out = [f"Measured on {m.get('cpu', '?')} ({m.get('device', 'cpu')}, {m.get('threads')} threads), "
           f"{'quick sizes' if bench.get('quick') else 'full sizes'}, {bench.get('date', '')}:", ""]  # fmt: skip
    key = "mfu_gpu" if "mfu_gpu" in bench else "mfu_cpu"
    if key in bench:
        verdict = (
            "the step runs most of its FLOPs at GEMM speed"
            if bench[key] >= 0.5
            else "overheads outside the GEMMs dominate at this size (see the bench report's profile)"
        )
        out.append(f"- step MFU {bench[key]:.2f} ({key}): {verdict}.")
    if "loader_to_train_ratio" in bench:
        lsps = (bench.get("details", {}).get("loader") or {}).get("loader_samples_per_s")
        if lsps:
            need = max(r[2] / project(GPUS[1], False, r, calibrated_mfu())["hours"] / 3600 for r in RUNS)
            per_rank = need / N_GPUS  # every rank streams its own share with its own workers
            verdict = "keeps up" if lsps >= per_rank else "does NOT keep up: add CPU workers"
            out.append(
                f"- data pipeline {lsps:,.0f} samples/s on this machine's {m.get('cores', '?')} cores; the fastest "
                f"projected stage (8x H100) needs {need:,.0f} samples/s in all, {per_rank:,.0f} per rank: it {verdict}."
            )
    fc = bench.get("feature_cache") or {}
    if fc:
        out.append("- feature cache efficiency " + ", ".join(f"{k} {v['efficiency']:.2f}" for k, v in fc.items())
                   + ": stages run at the encoder-free rate the projection assumes.")  # fmt: skip
    return out


def write_scaling(bench_path: Path, out: Path) -> Path:
    bench = json.loads(Path(bench_path).read_text()) if Path(bench_path).is_file() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(bench))
    return out


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.0f} min"
