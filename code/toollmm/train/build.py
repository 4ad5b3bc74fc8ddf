"""Everything a stage needs before the engine: seeds, the feature pre-pass, the model (+ ``init_from``),
the trainable set, caption targets and the data streams."""

from __future__ import annotations

import json
import logging
import math
import random

import numpy as np
import torch

from toollmm.core.errors import NotUtf8, iter_text_lines
from toollmm.core.paths import resolve

from ..checkpoint.stage import check_bases, load_into, read_manifest
from ..data.records import MEDIA_KEYS
from ..data.sources import is_shard_folder
from .targets import precompute_captions

log = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_init_from(cfg, stage_dir) -> None:
    """``train.init_from: previous`` -> this run's stage N-1 folder (written into the config, so the stage
    folder records the real path); a missing folder is an error before anything expensive runs."""
    if cfg.train.init_from != "previous":
        return
    if cfg.run.stage < 1:
        raise ValueError("train.init_from=previous: stage 0 has no previous stage")
    prev = stage_dir.parent / f"stage_{cfg.run.stage - 1}"
    if not (prev / "stage.json").is_file():
        raise ValueError(
            f"train.init_from=previous: {prev} holds no finished stage {cfg.run.stage - 1} of run "
            f"{cfg.run.name!r}; train that stage first, or set train.init_from=<stage folder>"
        )
    cfg.train.init_from = str(prev)


def check_init_from_bases(cfg, rank: int) -> None:
    """``train.init_from`` must have been trained on the base models this run uses
    (:func:`toollmm.checkpoint.stage.check_bases`; ``model.allow_base_mismatch=true`` warns instead). Checked
    before anything expensive runs, by rank 0 alone (hashes memoised); every rank hears the verdict, so
    a refusal stops them all rather than leaving some waiting in a collective."""
    if not cfg.train.init_from:
        return
    error = None
    if rank == 0:
        try:
            d = resolve(cfg.train.init_from)
            check_bases(read_manifest(d, verify=False), cfg.model, d)
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            error = e
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def build_run(cfg, rank: int, world: int, report: dict | None = None, llm=None):
    """(model, trainable counts, train stream, held-out stream or None). Media come from the feature
    cache when it is enabled: the pre-pass encodes what is missing on this rank's accelerator and frees
    the encoder before the engine sees the model; a stage whose data has no media never builds it.
    ``report`` (a dict) receives the pre-pass statistics under ``"features"``; ``llm``: an already
    prepared ``LLMBundle`` instead of loading ``model.llm.path`` (the GPU check's random 7B model)."""
    from ..data.pipeline import make_processor
    from ..data.stream import TrainStream
    from ..model.toollmm_model import build_model

    encoder = cache = None
    if not has_media(cfg):
        log.info("no media in this stage's data: the encoder is not built")
    elif cfg.model.feature_cache.enabled:
        from .features import precompute_features

        cache, stats = precompute_features(cfg, rank, world)
        if report is not None:
            report["features"] = stats.as_dict()
    elif _zero3(cfg):
        raise ValueError(
            f"{cfg.train.deepspeed_config}: ZeRO-3 needs model.feature_cache.enabled=true (the encoder "
            "runs per modality present, and ZeRO-3 ranks must make the same module calls)"
        )
    else:
        from ..model.encoder import build_encoder

        encoder = build_encoder(cfg.model)  # runs inside the model; the engine places and casts it
    seed_all(cfg.run.seed)  # identical init on every rank
    model = build_model(cfg.model, llm=llm, encoder=encoder, loss_weights=cfg.train.loss_weights)
    if cfg.train.init_from:
        loaded = load_into(model, resolve(cfg.train.init_from))
        log.info("init_from %s: parts %s", cfg.train.init_from, loaded.parts)
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


def _zero3(cfg) -> bool:
    from .ds import load_ds_json

    return int(load_ds_json(cfg.train.deepspeed_config).get("zero_optimization", {}).get("stage", 0)) == 3


def has_media(cfg, probe: int = 200) -> bool:
    """Cheap check: does any source record mention a medium? (the first ``probe`` records of each
    JSONL file or shard folder; a shard's ``media.json`` manifest or record lists its media)."""
    for src in list(cfg.data.train) + list(cfg.data.heldout):
        p = resolve(src.path)
        if is_shard_folder(p):
            if _shards_have_media(src, probe):
                return True
            continue
        for _, (_, line) in zip(range(probe), iter_text_lines(p)):
            if isinstance(line, NotUtf8):
                continue  # the stream names it (file, line, byte offset) under data.on_error
            try:
                rec = json.loads(line) if line.strip() else {}
            except ValueError:
                continue  # the stream reports malformed lines under data.on_error
            if _mentions_media(rec):
                return True
    return False


def _mentions_media(rec) -> bool:
    return isinstance(rec, dict) and any(rec.get(k) for k in MEDIA_KEYS.values())


def _shards_have_media(src_cfg, probe: int) -> bool:
    from ..data.records import BadSample
    from ..data.shards import ShardSource

    shards = ShardSource(src_cfg.path, name=src_cfg.name)
    for i in range(min(probe, len(shards))):
        try:
            sample = shards.load(i)
        except BadSample:
            continue  # the stream reports it under data.on_error
        if _mentions_media(sample.record) or any(sample.media.values()):
            return True
    return False


def total_steps(cfg, stream) -> int:
    """Optimiser steps of the stage: ``train.max_steps``, else ``train.epochs`` over the stream."""
    if cfg.train.max_steps:
        return int(cfg.train.max_steps)
    return max(1, math.ceil(stream.steps_per_epoch * cfg.train.epochs / cfg.train.grad_accum))
