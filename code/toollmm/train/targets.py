"""Stage-2/3 alignment targets: every ``generate`` caption embedded once by its decoder's own text encoder.

Before training, the captions of the run's JSONL sources that the store lacks are embedded
(``toollmm.data.captions.embed_captions`` with ``DecoderPool.encode_captions``) by rank 0; the others
wait. Records need no ``embedding`` key: the stream finds a target by ``caption_key(caption, decoder id)``.
Shard sources carry their embeddings already (``prepare_data.py embed-captions`` + ``shard``).
"""

from __future__ import annotations

import json
import logging
import time

import torch

from toollmm.core.errors import iter_text_lines
from toollmm.core.paths import resolve
from toollmm.data.captions import CaptionStore, EncodeCaptions, embed_captions

log = logging.getLogger(__name__)


def _jsonl_records(cfg):
    for src in list(cfg.data.train) + list(cfg.data.heldout):
        p = resolve(src.path)
        if p.is_dir():
            continue
        for _, line in iter_text_lines(p):
            if isinstance(line, str) and '"generate"' in line:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # the stream reports malformed (or non-UTF-8) lines under its own policy


def needs_targets(cfg, model) -> bool:
    w = cfg.train.loss_weights
    aligned = [m for m in model.output_proj if w.get(f"align_{m}", w.get("align", 1.0)) != 0.0]
    return bool(aligned) and bool(cfg.data.captions)


def precompute_captions(cfg, model, rank: int = 0) -> dict[str, str] | None:
    """Embed missing captions; returns the decoder ids the stream uses as caption keys (None: no targets)."""
    if not needs_targets(cfg, model):
        return None
    records = list(_jsonl_records(cfg))
    if not records:
        return None
    modalities = sorted(
        {g["modality"] for r in records for m in r["messages"] for g in m.get("generate") or []}
    )
    encoders, ids = decoder_encoders(cfg)
    missing = [m for m in modalities if m not in encoders]
    if missing:
        raise ValueError(f"records ask to generate {missing} but model.decoders has no path for it")
    if rank == 0:
        t0 = time.perf_counter()
        log.info("caption targets in %s: embedding the captions not stored yet (once)", cfg.data.captions)
        _, counts = embed_captions(records, encoders, ids, CaptionStore(resolve(cfg.data.captions)))
        log.info("caption targets in %s: %s in %.1f s", cfg.data.captions, counts, time.perf_counter() - t0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return ids


def decoder_encoders(cfg) -> tuple[dict[str, EncodeCaptions], dict[str, str]]:
    """``encode_captions`` per enabled decoder (``toollmm.model.decoders.DecoderPool``) and each decoder's
    identity for the store key: its path plus the names and sizes of its text-encoder files."""
    from functools import partial

    from toollmm.model.decoders import DecoderPool, pipeline_folder

    pool = DecoderPool(cfg.model.decoders)
    ids = {}
    for m in pool.enabled():
        folder = pipeline_folder(pool.config(m).path)
        files = sorted(
            p for sub in ("text_encoder", "tokenizer") for p in (folder / sub).glob("*") if p.is_file()
        )
        ids[m] = f"{folder}|" + ",".join(f"{p.parent.name}/{p.name}:{p.stat().st_size}" for p in files)
    return {m: partial(pool.encode_captions, m) for m in pool.enabled()}, ids
