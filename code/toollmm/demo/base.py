"""The demo's base models, placed in ``outputs/demo/base/`` the way a user places real checkpoints.

    python code/prepare_data.py demo-base --config config/demo.yaml --corpus data/demo --output outputs/demo/base

writes (``toollmm.model.tiny.build_base_models``) ``imagebind/imagebind_tiny.pth``, ``llm_init/`` (a random
Llama with the corpus's tokenizer; stage 0 pretrains it into ``llm/``) and ``diffusion/tiny-*/``, then
calibrates the tiny ImageBind's output heads on a sample of the corpus's TRAINING media (no labels).

Why calibrate: a randomly initialised ImageBind maps every input of a modality to nearly the same unit
vector (the per-dimension spread of the pooled embeddings is 0.7-3 % of their mean's length), so
gradient descent on a projection of them crawls: an Adam-trained linear probe on such raw embeddings
reached 40-57 % held-out accuracy on image shape and chance on video direction after 500-1000 steps,
against 88-94 % and 64 % on the same embeddings standardised. A trained ImageBind spreads its embeddings
out; the stand-in gets that property by whitening each head: the head's LayerNorm bias is shifted by
the mean of the head's input and its final Linear becomes the inverse square root of their covariance
(ZCA), so the joint-space embeddings are centred and decorrelated before ImageBind's own L2
normalisation. The trunk stays random, the architecture and the checkpoint format are unchanged
(strict keys), and the encoder is still frozen in every stage.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch

from toollmm.core.paths import resolve

from ..model.tiny import TinyLlama

log = logging.getLogger(__name__)

MEDIA_KEY = {"image": "images", "audio": "audios", "video": "videos"}
TOWER = {"image": "vision", "video": "vision", "audio": "audio"}
#: training media per modality used for the statistics (fewer when the corpus has fewer)
CALIBRATION_MEDIA = {"image": 120, "video": 60, "audio": 68}


def training_media(corpus: Path, modality: str, n: int, seed: int = 0) -> list[Path]:
    """A seeded sample of ``n`` distinct training media of ``modality`` (from ``train/x2t_<m>.jsonl``)."""
    path = corpus / "train" / f"x2t_{modality}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no demo corpus here (python code/prepare_data.py demo)")
    files = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            files += json.loads(line).get(MEDIA_KEY[modality]) or []
    files = sorted(set(files))
    random.Random(seed).shuffle(files)
    return [corpus / f for f in files[:n]]


def zca(x: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ZCA whitening matrix ``C^-1/2`` of rows ``x`` (eigenvalues floored relative to the largest)."""
    x = x.double()
    mean = x.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(x.T))
    evals = evals.clamp(min=float(evals.max()) * floor)
    return mean.float(), (evecs @ torch.diag(evals.rsqrt()) @ evecs.T).float()


@torch.no_grad()
def calibrate_heads(encoder, media: dict[str, list[Path]], batch_size: int = 16) -> dict[str, int]:
    """Whiten each tower's head (LayerNorm -> select CLS -> Linear) on the given media, in place.
    Returns the number of head inputs (clips x crops) used per tower."""
    from toollmm.data.preprocess import load_media

    heads = encoder.model.modality_heads
    seen: dict[str, list[torch.Tensor]] = {TOWER[m]: [] for m in media}
    hooks = [
        heads[t][-1].register_forward_hook(lambda mod, inp, out, t=t: seen[t].append(inp[0].detach().float()))
        for t in seen
    ]
    try:
        for m, files in media.items():
            for i in range(0, len(files), batch_size):
                chunk = files[i : i + batch_size]
                encoder.encode(m, torch.stack([load_media(m, f, encoder.preprocess) for f in chunk]))
    finally:
        for h in hooks:
            h.remove()
    counts = {}
    for tower, rows in seen.items():
        norm, _, linear = heads[tower]
        x = torch.cat(rows)
        if linear.bias is not None or linear.in_features != linear.out_features:
            raise ValueError(f"{tower} head: expected a square Linear without bias, got {linear}")
        if x.shape[0] <= x.shape[1]:
            raise ValueError(f"{tower} head: {x.shape[0]} samples cannot whiten {x.shape[1]} dimensions")
        mean, white = zca(x)
        norm.bias -= mean.to(norm.bias.dtype)  # the head's input is now centred ...
        linear.weight.copy_(white.to(linear.weight.dtype))  # ... and the Linear decorrelates it
        counts[tower] = int(x.shape[0])
    return counts


#: the stand-in LM: 4 layers x 128, 4 heads of 32 dims, untied head. (This said 8 heads from 2026-12-04, after
#: one paired side-harness run, 0.45 against 0.30 exact calls, but demo.sh's base models came from
#: prepare_data.py, whose flags' own defaults replaced this shape: every demo run since trained 4 heads. On a
#: corpus with more phrasings tried on 2026-12-05 the stage-0 LM scored 0.548 with 8 heads, 0.564 with 8 heads
#: and a tied head, 0.684 with 4, one seed each: 4 it stays.)
DEMO_LLM = TinyLlama(num_attention_heads=4, num_key_value_heads=4)


def build_demo_base(
    config_files: list[str | os.PathLike], corpus: str | os.PathLike, output: str | os.PathLike, llm=None
) -> dict[str, Path]:
    """Write every base model of the demo into ``output`` and calibrate the encoder (see module doc)."""
    from toollmm.core.config import load_config

    from ..model.encoder import build_encoder
    from ..model.tiny import build_base_models

    cfg = load_config(config_files=list(config_files)).config
    corpus, out = resolve(corpus), resolve(output)
    paths = build_base_models(out, corpus / "tokenizer", cfg.model, llm=llm or DEMO_LLM)
    enc_path = paths["encoder"]
    if cfg.model.encoder.checkpoint and resolve(cfg.model.encoder.checkpoint) != enc_path.resolve():
        log.warning(
            "model.encoder.checkpoint is %s but the demo encoder was written to %s",
            cfg.model.encoder.checkpoint,
            enc_path,
        )
    cfg.model.encoder.checkpoint = str(enc_path)
    encoder = build_encoder(cfg.model)
    media = {m: training_media(corpus, m, n) for m, n in CALIBRATION_MEDIA.items()}
    counts = calibrate_heads(encoder, media)
    tmp = enc_path.with_name(enc_path.name + ".tmp")
    torch.save(encoder.model.state_dict(), tmp)
    os.replace(tmp, enc_path)
    log.info("calibrated the tiny ImageBind heads on %s head inputs -> %s", counts, enc_path)
    return paths
