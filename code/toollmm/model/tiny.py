"""Tiny base models placed exactly as real checkpoints are: for tests, benchmarks and the demo.

``build_base_models(out_dir, tokenizer_dir, model_cfg)`` writes

    <out>/imagebind/imagebind_tiny.pth   a seeded random ImageBindModel of ``model_cfg.encoder.dims``,
                                         saved as a plain state dict (loaded like imagebind_huge.pth)
    <out>/llm_init/                      a randomly initialised Llama (HF folder + the given tokenizer)
    <out>/diffusion/tiny-{sd,t2v,audioldm}/   tiny diffusers pipelines (save_pretrained folders)

so every later step goes through the real loaders (strict ImageBind keys, ``from_pretrained``,
``DiffusionPipeline.from_pretrained``) with nothing downloaded. ``write_llm`` is the one random-Llama
writer (the benchmarks' LLMs up to Vicuna-7B's shape too); ``TinyLlama`` its shape.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from toollmm.core.files import respect_umask

log = logging.getLogger(__name__)


@dataclass
class TinyLlama:
    """A Llama shape (``LlamaConfig`` field names); the defaults give ~1.3 M parameters plus embeddings.
    ``vocab_size`` None = the tokenizer's length; larger pads the vocabulary (rows the tokenizer never uses)."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    vocab_size: int | None = None


def write_llm(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    shape: TinyLlama | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> Path:
    """A seeded random Llama of ``shape`` saved with the tokenizer as an HF folder, built in ``dtype``
    (default: torch's; a 7B shape is built in bf16 to halve host memory). A new folder is written next to
    ``out_dir`` and renamed into place, so an interrupted write never leaves a half folder that looks
    complete; an existing folder is written over in place."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = shape or TinyLlama()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dims = {k: v for k, v in shape.__dict__.items() if k != "vocab_size"}
    cfg = LlamaConfig(
        vocab_size=shape.vocab_size or len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **dims,
    )
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype or default)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
    out = Path(out_dir)
    tmp = out if out.exists() else out.with_name(out.name + ".tmp")
    if tmp != out:
        shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    respect_umask(tmp)  # safetensors writes 0600
    if tmp != out:
        os.replace(tmp, out)
    return out


def write_encoder(path: str | Path, model_cfg) -> Path:
    """Save the seeded random ImageBind of ``model_cfg.encoder`` as a checkpoint file."""
    from .encoder import build_encoder

    cfg = copy.deepcopy(model_cfg)
    cfg.encoder.checkpoint = None
    enc = build_encoder(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(enc.model.state_dict(), path)
    return path


def build_base_models(
    out_dir: str | Path, tokenizer_dir: str | Path, model_cfg, llm: TinyLlama | None = None, seed: int = 0
) -> dict[str, Path]:
    from .tiny_decoders import build_tiny_decoders

    out = Path(out_dir)
    paths = {
        "encoder": write_encoder(out / "imagebind" / "imagebind_tiny.pth", model_cfg),
        "llm_init": write_llm(out / "llm_init", tokenizer_dir, llm, seed),
    }
    paths.update({f"decoder_{m}": p for m, p in build_tiny_decoders(out / "diffusion", seed=seed).items()})
    log.info("base models in %s: %s", out, {k: str(v) for k, v in paths.items()})
    return paths
