"""The benchmark's workspace: demo corpus, base models and run configs, built once and reused.

``World.ensure(work, sizes)`` writes (if missing) under ``work``:

    demo/ or demo_small/        the demo corpus (``code/prepare_data.py demo``; its tokenizer is the LLM's)
    llm_<sizes.name>/           a randomly initialised Llama of ``sizes`` (HF folder + the demo tokenizer)
    decoders/                   tiny diffusers pipelines (their configs fix the output projections' shapes)

``World.config(name, stage, train=..., data=..., model=...)`` layers a run's YAML over ``config/model.yaml``
and ``config/stage_N.yaml`` exactly as ``code/train.py --config`` does, so every benchmark trains through
the real recipe; only sizes, data paths and the bench's base models differ.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from toollmm.core.config import EncoderDims, Loaded, PreprocessConfig, load_config
from toollmm.core.paths import REPO_ROOT
from toollmm.model.tiny import TinyLlama, write_llm
from toollmm.perf.flops import (
    AUDIO_PATCH,
    AUDIO_TOKENS,
    VICUNA_7B,
    VISION_PATCH,
    VISION_TOKENS,
    LlamaShape,
    encoder_flops_per_input,
    train_flops,
    vit_forward_flops,
    width_for,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sizes:
    """Everything a benchmark run's size depends on (``--quick`` shrinks it; the JSON records it)."""

    name: str
    llm: LlamaShape
    demo_small: bool
    micro_batch: int  # stage 3 (tool file): ~1000 real tokens per step at full size
    stage1_micro_batch: int  # stages 1 and 2 (both 32 in config/stage_{1,2}.yaml)
    max_length: int = 512
    warmup: int = 2
    rounds: int = 5  # MFU: rounds x steps_per_round timed steps, each between two GEMM bursts
    steps_per_round: int = 3
    stage_rounds: int = 3  # stage-1 / stage-2 MFU: fewer rounds (they are reported figures, not targets)
    trainer_steps: int = 12  # vs-HF runs, each side
    cache_steps: int = 8  # feature-cache runs, each side
    loader_batches: int = 20
    repeats: int = 3  # vs-HF: alternate ours / HF this many times
    gemm_seconds: float = 1.5  # per GEMM burst (gemm.BURST_SHAPES)
    new_tokens: int = 32  # inference
    profile: bool = True  # torch.profiler table of two MFU steps (outputs/bench/figures/profile_mfu.txt)
    grad_ckpt: bool = False  # activation checkpointing (the real 7B config's setting)
    extra: dict = field(default_factory=dict)


FULL = Sizes(
    "full",
    LlamaShape(hidden=768, layers=8, intermediate=2048, vocab=32000, heads=12, kv_heads=12),
    demo_small=False,
    micro_batch=6,
    stage1_micro_batch=8,
    # sized so the full run fits in ~15 minutes on the shared 2-core machine (it took ~20 with the defaults)
    trainer_steps=8,
    cache_steps=4,
    loader_batches=10,
    repeats=2,
)
QUICK = Sizes(
    "quick",
    LlamaShape(hidden=256, layers=2, intermediate=688, vocab=32000, heads=4, kv_heads=4),
    demo_small=True,
    micro_batch=4,
    stage1_micro_batch=2,
    warmup=1,
    rounds=2,
    steps_per_round=2,
    stage_rounds=1,
    trainer_steps=4,
    cache_steps=2,
    loader_batches=6,
    repeats=1,
    gemm_seconds=0.2,
    new_tokens=8,
    profile=False,
)
#: GPU hosts only: the real LLM shape (random weights from its config), to check docs/scaling.md
VICUNA = Sizes(
    "vicuna7b",
    VICUNA_7B,
    demo_small=False,
    micro_batch=16,
    stage1_micro_batch=32,
    max_length=2048,
    trainer_steps=20,
    gemm_seconds=2.0,
    grad_ckpt=True,
)
SIZES = {"full": FULL, "quick": QUICK, "vicuna7b": VICUNA}

#: output projections scaled with the LLM so trainable projections : LLM parameters stay near the real
#: run's (NExT-GPT shape on Vicuna-7B: 95.8 M : 6.74 B = 1.4 %); d 64 / ff 256 / 4+4 layers on a 106 M LLM
OUTPUT_PROJ = {"d_model": 64, "num_heads": 4, "dim_feedforward": 256}
#: the towers the benchmark never runs stay as small as the tiny preset's
_IDLE_TOWERS = {
    **{f"{t}_embed_dim": 32 for t in ("text", "depth", "thermal", "imu")},
    **{f"{t}_num_blocks": 1 for t in ("text", "depth", "thermal", "imu")},
    **{f"{t}_num_heads": 2 for t in ("text", "depth", "thermal", "imu")},
    "imu_drop_path": 0.0,
}
HUGE = EncoderDims()


def encoder_dims_for(shape: LlamaShape, sample_tokens: float, sup_tokens: float) -> dict:
    """ImageBind dims whose per-medium FLOPs relative to a stage-1 training step of ``shape`` on one
    sample equal ImageBind-huge's relative to Vicuna-7B's (same tokens per sample; huge's depths and head
    counts kept, widths scaled). Returns the ``model.encoder.dims`` block."""
    pre = PreprocessConfig()
    n = round(sample_tokens)
    scale = train_flops(shape, [n], round(sup_tokens)) / train_flops(VICUNA_7B, [n], round(sup_tokens))
    vision = scale * encoder_flops_per_input(HUGE, pre, "image")
    audio = scale * encoder_flops_per_input(HUGE, pre, "audio") / pre.audio_clips
    vw, vb = _tower(vision, HUGE.vision_num_blocks, VISION_TOKENS, VISION_PATCH, HUGE.vision_num_heads)
    aw, ab = _tower(audio, HUGE.audio_num_blocks, AUDIO_TOKENS, AUDIO_PATCH, HUGE.audio_num_heads)
    return {
        "out_embed_dim": HUGE.out_embed_dim,
        "vision_embed_dim": vw,
        "vision_num_blocks": vb,
        "vision_num_heads": HUGE.vision_num_heads,
        "audio_embed_dim": aw,
        "audio_num_blocks": ab,
        "audio_num_heads": HUGE.audio_num_heads,
        "audio_drop_path": 0.0,
        **_IDLE_TOWERS,
    }


def _tower(target: float, blocks: int, tokens: int, patch: int, heads: int) -> tuple[int, int]:
    """(width, blocks): huge's depth and the closest width (a multiple of the head count); when even the
    narrowest width overshoots (a very small LLM), fewer blocks."""
    w = width_for(target, blocks, tokens, patch, heads)
    f = vit_forward_flops(w, blocks, tokens, patch)
    if f > 1.25 * target:
        blocks = max(1, round(blocks * target / f))
    return w, blocks


def llama_dims(shape: LlamaShape) -> TinyLlama:
    """``shape`` as ``toollmm.model.tiny.write_llm`` takes it (its vocabulary rows beyond the tokenizer
    stay unused, as in a model that pads its vocabulary)."""
    return TinyLlama(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        vocab_size=shape.vocab,
    )


def demo_corpus(out: Path, small: bool) -> Path:
    """The demo corpus in ``out`` through its entry point, ``code/prepare_data.py demo`` (benchmark code
    never imports the demo package). Raises naming the command and its last output lines on failure."""
    cmd = [sys.executable, str(REPO_ROOT / "code" / "prepare_data.py"), "demo", "--output", str(out)]
    run = subprocess.run(cmd + (["--small"] if small else []), capture_output=True, text=True)
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-10:])
        raise RuntimeError(f"{' '.join(cmd)} exited {run.returncode}:\n{tail}")
    return out


def render_stats(path: Path, tokenizer_dir: Path, max_length: int = 2048) -> dict:
    """Mean tokens, mean supervised tokens and the length range of a JSONL file's samples, rendered by the
    training renderer (default config: one placeholder token per medium)."""
    from transformers import AutoTokenizer

    from toollmm.core.tokens import TokenContract
    from toollmm.data.pipeline import make_render_fn

    cfg = load_config(overrides=[f"data.max_length={max_length}"]).config
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    TokenContract.from_config(cfg.model.tokens).add_to(tok)
    render = make_render_fn(cfg, tok)
    lengths, sup = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = render(json.loads(line), where=f"{path}:{i + 1}")
            lengths.append(len(r.input_ids))
            sup.append(sum(1 for x in r.labels if x != -100))
    n = max(1, len(lengths))
    return {
        "samples": len(lengths),
        "tokens": sum(lengths) / n,
        "supervised": sum(sup) / n,
        "min": min(lengths, default=0),
        "max": max(lengths, default=0),
    }


class World:
    def __init__(self, work: Path, sizes: Sizes):
        self.work, self.sizes = Path(work), sizes
        self.demo = self.work / ("demo_small" if sizes.demo_small else "demo")
        self.llm = self.work / f"llm_{sizes.name}"
        self.decoders = self.work / "decoders"

    @classmethod
    def ensure(cls, work: Path, sizes: Sizes) -> World:
        w = cls(work, sizes)
        w.work.mkdir(parents=True, exist_ok=True)
        if not (w.demo / "summary.json").is_file():
            demo_corpus(w.demo, small=sizes.demo_small)
        if not (w.llm / "config.json").is_file():
            import torch

            big = sizes.llm.total_params > 2e9  # a 7B model is built in bf16 (half the host memory)
            write_llm(
                w.llm, w.demo / "tokenizer", llama_dims(sizes.llm), dtype=torch.bfloat16 if big else None
            )
        if not (w.decoders / "tiny-sd" / "model_index.json").is_file():
            from toollmm.model.tiny_decoders import build_tiny_decoders

            build_tiny_decoders(w.decoders)
        return w

    def source(self, split: str, name: str, **kw) -> dict:
        return {"path": str(self.demo / split / f"{name}.jsonl"), "media_root": str(self.demo), **kw}

    def token_stats(self, name: str) -> dict:
        """Per-sample token statistics of a training file (``render_stats``), cached in the workspace."""
        cache = self.work / "token_stats.json"
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        key = f"{self.demo.name}/{name}"
        if key not in known:
            known[key] = render_stats(self.demo / "train" / f"{name}.jsonl", self.demo / "tokenizer")
            cache.write_text(json.dumps(known, indent=1))
        return known[key]

    def encoder_dims(self) -> dict:
        st = self.token_stats("x2t_image")
        return encoder_dims_for(self.sizes.llm, st["tokens"], st["supervised"])

    def config(self, name: str, stage: int, *, train: dict, data: dict, model: dict | None = None) -> Loaded:
        """Write ``configs/<name>.yaml`` and load it over the stage's YAML (see the module docstring)."""
        m = {
            "encoder": {"preset": "bench", "checkpoint": None, "seed": 0, "dims": self.encoder_dims()},
            "feature_cache": {"dir": str(self.work / "features")},
            "llm": {"path": str(self.llm), "gradient_checkpointing": self.sizes.grad_ckpt},
            "output_proj": {k: dict(OUTPUT_PROJ) for k in ("image", "video", "audio")},
            "decoders": {
                "image": {"path": str(self.decoders / "tiny-sd")},
                "video": {"path": str(self.decoders / "tiny-t2v")},
                "audio": {"path": str(self.decoders / "tiny-audioldm")},
            },
        }
        _merge(m, model or {})
        tree = {
            "run": {"name": name, "output_root": str(self.work / "runs")},
            "model": m,
            "data": {"heldout": [], "captions": str(self.work / "captions"), **data},
            "train": {
                "init_from": None,
                "grad_accum": 1,
                "eval_every": 0,
                "save_every": 0,
                "log_every": 1,
                "keep_last": 1,
                **train,
            },
            "logging": {"wandb_mode": "disabled", "level": "WARNING"},
        }
        path = self.work / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return load_config(stage=stage, config_files=[path])

    def describe(self) -> dict:
        return {"sizes": self.sizes.name, "llm": asdict(self.sizes.llm), "demo": self.demo.name}


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
