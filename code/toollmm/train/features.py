"""Encode every medium of the run's sources once, before training, into the feature cache.

The encoder is frozen, so stages read cached features instead of re-running it (and the DataLoader
workers never hold its weights). Each rank encodes a disjoint share of every source; entries are
written atomically, so ranks and later runs share the cache. Afterwards the encoder is dropped and
only its identity is kept for cache lookups.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..data.records import BadSample
from ..data.sources import open_source
from ..model.feature_cache import FeatureCache
from ..model.preprocess import MediaError

log = logging.getLogger(__name__)


@dataclass
class EncoderInfo:
    """What cache lookups need from an encoder: its identity and output shapes, no weights."""

    identity: str
    output: str
    preprocess: object
    out_dim: int
    per_input: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, encoder) -> EncoderInfo:
        per = {m: encoder.outputs_per_input(m) for m in ("image", "video", "audio")}
        return cls(encoder.identity, encoder.output, encoder.preprocess, int(encoder.out_dim), per)

    def outputs_per_input(self, modality: str) -> int:
        return self.per_input[modality]


def _flush(cache: FeatureCache, modality: str, items: list, on_error: str) -> int:
    """Encode a batch; on a bad medium retry one by one so only the bad ones are dropped."""
    try:
        cache.get_many(modality, [d for d, _ in items], [n for _, n in items])
        return 0
    except MediaError:
        if len(items) == 1:
            if on_error == "raise":
                raise
            return 1
        return sum(_flush(cache, modality, [it], on_error) for it in items)


def precompute_features(cfg, encoder, rank: int = 0, world: int = 1) -> FeatureCache:
    """Fill the feature cache for ``cfg.data.train`` + ``cfg.data.heldout``; returns a lookup-only cache."""
    cache = FeatureCache.from_config(cfg.model.feature_cache, encoder)
    log.info("feature cache %s: encoding the media not cached yet (once; later runs reuse them)", cache.root)
    t0 = time.perf_counter()
    bad = 0
    pending: dict[str, list] = {}
    with torch.no_grad():
        for src_cfg in list(cfg.data.train) + list(cfg.data.heldout):
            src = open_source(src_cfg, cfg.data.captions)
            for i in range(rank, len(src), world):
                try:
                    sample = src.load(i)
                except BadSample:
                    if cfg.data.on_error == "raise":
                        raise
                    bad += 1  # the stream skips and counts it again, by reason
                    continue
                for modality, medias in sample.media.items():
                    for m in medias:
                        if m.features is None and m.data is not None:
                            pending.setdefault(modality, []).append((m.data, f"{sample.where} {m.name}"))
                    if len(pending.get(modality, ())) >= cache.batch_size:
                        bad += _flush(cache, modality, pending.pop(modality), cfg.data.on_error)
        for modality, items in pending.items():
            bad += _flush(cache, modality, items, cfg.data.on_error)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    log.info(
        "feature cache %s: %s on rank %d in %.1f s (%d bad media left to the stream's policy)",
        cache.root,
        cache.stats,
        rank,
        time.perf_counter() - t0,
        bad,
    )
    cache.encoder = EncoderInfo.of(encoder)  # lookups only from here on; the encoder can be freed
    return cache
