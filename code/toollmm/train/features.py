"""Encode every medium of the run's sources once, before training, into the feature cache.

The encoder is frozen, so stages read cached features instead of re-running it (and the DataLoader
workers never hold its weights). The pre-pass walks the sources in windows of samples; in each window
every rank hashes its share of the samples' media, drops what the cache already holds, and the ranks
agree (one ``all_gather_object``) on one owner per uncached key, so a medium that appears in several
samples or on several ranks is encoded exactly once. The encoder is built only when some medium is
missing, on the rank's accelerator in the run's compute dtype (``encoder_placement``), and freed before
training starts; cache entries are written atomically (``FeatureCache``), so a killed pre-pass resumes
where it stopped. ``code/prepare_data.py encode`` runs the same pass offline, after which training never
builds the encoder at all.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from toollmm.core.tokens import MODALITIES
from toollmm.data.preprocess import MediaError

from ..data.records import BadSample
from ..data.sources import open_source
from ..model.feature_cache import FeatureCache

log = logging.getLogger(__name__)

#: samples per rank hashed before the ranks agree on who encodes what (bounds the media held in memory)
WINDOW = 256


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
        per = {m: encoder.outputs_per_input(m) for m in MODALITIES}
        return cls(encoder.identity, encoder.output, encoder.preprocess, int(encoder.out_dim), per)

    @classmethod
    def from_config(cls, model_cfg, dtype: torch.dtype = torch.float32) -> EncoderInfo:
        """The info ``build_encoder(model_cfg, dtype=dtype)`` would give, without building the encoder."""
        from ..model.encoder import encoder_identity

        pre, output = model_cfg.preprocess, model_cfg.encoder.output
        per = {"image": 1, "audio": pre.audio_clips, "video": pre.video_clips}
        if output == "pooled":
            per = dict.fromkeys(per, 1)
        ident = encoder_identity(model_cfg, dtype)
        return cls(ident, output, pre, int(model_cfg.encoder.dims.out_embed_dim), per)

    def outputs_per_input(self, modality: str) -> int:
        return self.per_input[modality]


def encoder_placement(cfg, world: int = 1) -> tuple[torch.device, torch.dtype]:
    """Where the pre-pass runs the encoder: this rank's GPU in the run's compute dtype (the DeepSpeed
    config's precision, as training uses it), else the CPU in fp32."""
    if torch.cuda.is_available():
        from .ds import build_ds_config, compute_dtype

        dtype = compute_dtype(build_ds_config(cfg, world, on_gpu=True))
        return torch.device("cuda", torch.cuda.current_device()), dtype
    return torch.device("cpu"), torch.float32


@dataclass
class PrepassStats:
    """Per-modality media counts of one pre-pass (this rank's, or summed over ranks)."""

    encoded: Counter = field(default_factory=Counter)  # encoded and written by this pass
    cached: Counter = field(default_factory=Counter)  # already in the cache
    failed: Counter = field(default_factory=Counter)  # unreadable media (left to the stream's policy)
    duplicates: int = 0  # media met again after their first occurrence in this pass
    bad_samples: int = 0  # records the stream will skip (data.on_error=skip)
    encoder_forwards: int = 0
    encoder_built: bool = False
    seconds: float = 0.0

    def merge(self, other: PrepassStats) -> None:
        for name in ("encoded", "cached", "failed"):
            getattr(self, name).update(getattr(other, name))
        self.duplicates += other.duplicates
        self.bad_samples += other.bad_samples
        self.encoder_forwards += other.encoder_forwards
        self.encoder_built = self.encoder_built or other.encoder_built
        self.seconds = max(self.seconds, other.seconds)

    def as_dict(self) -> dict:
        modalities = sorted(set(self.encoded) | set(self.cached) | set(self.failed))
        return {
            "media": {
                m: {"encoded": self.encoded[m], "cached": self.cached[m], "failed": self.failed[m]}
                for m in modalities
            },
            "duplicates": self.duplicates,
            "bad_samples": self.bad_samples,
            "encoder_forwards": self.encoder_forwards,
            "encoder_built": self.encoder_built,
            "seconds": round(self.seconds, 2),
        }


def owner_of(key: str, holders: list[int]) -> int:
    """The one rank (among those holding the medium) that encodes ``key``: spread by the key's hash."""
    return holders[int(key[:8], 16) % len(holders)]


def owned_keys(per_rank: list[list[str]], rank: int) -> set[str]:
    """The keys ``rank`` encodes, given every rank's uncached keys of a window: each key exactly once
    over all ranks, always by a rank that holds its bytes."""
    holders: dict[str, list[int]] = {}
    for r, keys in enumerate(per_rank):
        for k in keys:
            holders.setdefault(k, []).append(r)
    return {k for k, hs in holders.items() if owner_of(k, hs) == rank}


class _Progress:
    """Rank 0's bar over the samples scanned, with encoded media/s (all ranks) and an ETA."""

    def __init__(self, total: int, rank: int, enabled: bool | None):
        if enabled is None:  # a bar on a terminal only: in a log file it is a line of \r updates
            from .tracking import console_is_terminal

            enabled = os.environ.get("TOOLLMM_NO_TQDM") != "1" and console_is_terminal()
        self.bar = None
        self.t0 = time.perf_counter()
        self.encoded = 0
        if rank == 0 and enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="encoding media", unit="sample", dynamic_ncols=True)

    def update(self, samples: int, encoded: int) -> None:
        self.encoded += encoded
        if self.bar is not None:
            rate = self.encoded / max(1e-9, time.perf_counter() - self.t0)
            self.bar.set_postfix({"media/s": f"{rate:.1f}", "encoded": self.encoded}, refresh=False)
            self.bar.update(samples)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _gather(obj, world: int) -> list:
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def precompute_features(
    cfg,
    rank: int = 0,
    world: int = 1,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    window: int = WINDOW,
    progress: bool | None = None,
    splits: tuple[str, ...] = ("train", "heldout"),
) -> tuple[FeatureCache, PrepassStats]:
    """Fill the feature cache for the media of ``cfg.data.train`` (+ ``heldout``). Returns a lookup-only
    cache (no encoder weights) and the statistics summed over ranks. Collective when ``world > 1``:
    every rank must call it."""
    if device is None or dtype is None:
        placed = encoder_placement(cfg, world)
        device, dtype = device or placed[0], dtype or placed[1]
    info = EncoderInfo.from_config(cfg.model, dtype)
    cache = FeatureCache.from_config(
        cfg.model.feature_cache, info, batch_size=batch_size or cfg.model.feature_cache.batch_size
    )
    stats = PrepassStats()
    t0 = time.perf_counter()
    sources = [open_source(s, cfg.data.captions) for split in splits for s in getattr(cfg.data, split)]
    bar = _Progress(sum(len(s) for s in sources), rank, progress)
    done: set[str] = set()  # keys met earlier in this pass (encoded, cached or failed)
    encoder = None
    try:
        for src in sources:
            n, step = len(src), window * world
            for start in range(0, n, step):
                pending = _scan(
                    src, range(start + rank, min(start + step, n), world), cache, done, stats, cfg
                )
                per_rank = _gather(sorted(pending), world)
                mine = owned_keys(per_rank, rank)
                done.update(k for keys in per_rank for k in keys)
                todo = {k: v for k, v in pending.items() if k in mine}
                if todo and encoder is None:
                    encoder = _build(cfg, device, dtype, info)
                    stats.encoder_built = True
                if todo:
                    _encode(cache, encoder, todo, stats, cfg.data.on_error)
                window_encoded = len({k for keys in per_rank for k in keys})
                bar.update(min(start + step, n) - start, window_encoded)
    finally:
        bar.close()
        cache.encoder = info  # lookups only from here on
        if encoder is not None:
            del encoder
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    stats.seconds = time.perf_counter() - t0
    total = PrepassStats()
    for s in _gather(stats, world):
        total.merge(s)
    log.info(
        "feature pre-pass (%s, %s on %s, rank %d of %d): %s",
        cache.root,
        str(dtype).removeprefix("torch."),
        device,
        rank,
        world,
        total.as_dict(),
    )
    return cache, total


def _scan(src, indices, cache: FeatureCache, done: set[str], stats: PrepassStats, cfg) -> dict:
    """Hash the media of samples ``indices``; return ``{key: (modality, data, name)}`` not yet cached."""
    pending: dict[str, tuple] = {}
    for i in indices:
        try:
            sample = src.load(i)
        except BadSample:
            if cfg.data.on_error == "raise":
                raise
            stats.bad_samples += 1  # the stream skips and counts it again, by reason
            continue
        for modality, medias in sample.media.items():
            for m in medias:
                if m.features is not None or m.data is None:
                    continue  # features stored with the sample: nothing to encode
                key = cache.key(modality, m.data)
                if key in done or key in pending:
                    stats.duplicates += 1
                elif cache.exists(modality, key):
                    stats.cached[modality] += 1
                    done.add(key)
                else:
                    pending[key] = (modality, m.data, f"{sample.where} {m.name}")
    return pending


def _build(cfg, device, dtype, info: EncoderInfo):
    from ..model.encoder import build_encoder

    log.info("building the encoder on %s (%s) for the media not in the cache", device, dtype)
    encoder = build_encoder(cfg.model, device=device, dtype=dtype)
    if encoder.identity != info.identity:  # the identity is computed twice; they must agree
        raise RuntimeError(f"encoder identity {encoder.identity} != cache identity {info.identity}")
    return encoder


def _encode(cache: FeatureCache, encoder, todo: dict, stats: PrepassStats, on_error: str) -> None:
    cache.encoder = encoder
    forwards = cache.forwards
    by_modality: dict[str, list] = {}
    for modality, data, name in todo.values():
        by_modality.setdefault(modality, []).append((data, name))
    for modality, items in by_modality.items():
        for s in range(0, len(items), cache.batch_size):
            _flush(cache, modality, items[s : s + cache.batch_size], on_error, stats)
    stats.encoder_forwards += cache.forwards - forwards


def _flush(cache: FeatureCache, modality: str, items: list, on_error: str, stats: PrepassStats) -> None:
    """Encode a batch; on a bad medium retry one by one so only the bad ones are dropped."""
    try:
        cache.get_many(modality, [d for d, _ in items], [n for _, n in items])
        stats.encoded[modality] += len(items)
    except MediaError as e:
        if len(items) == 1:
            if on_error == "raise":
                raise
            log.warning("feature pre-pass: %s", e)
            stats.failed[modality] += 1
        else:
            for it in items:
                _flush(cache, modality, [it], on_error, stats)
