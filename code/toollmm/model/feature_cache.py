"""On-disk cache of frozen-encoder outputs, shared by ranks and processes.

Key = sha256 over: the media content (sha256 of the file's bytes; of each frame's bytes for a frame-list
video), the encoder identity (checkpoint sha256 or random-init config + seed, and dtype), the output mode,
the modality and its preprocessing settings, and this format's version. Change any of them and the key
changes, so stale features are never read.

Layout: ``<root>/<encoder identity>/<output>/<modality>/<key[:2]>/<key>.safetensors``, one tensor
``features [n_out, D]`` (float32) plus metadata naming the source. Writes are atomic (temp file in the
same folder, fsync, ``os.replace``): readers see a whole file or none, and two ranks that miss the same
key at once both encode it and write identical bytes (harmless; the last rename wins).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from toollmm.core.config import FeatureCacheConfig
from toollmm.core.files import atomic_write_bytes, sha256_file
from toollmm.core.paths import resolve
from toollmm.core.safefiles import safetensors_bytes
from toollmm.data.preprocess import MediaError, VideoSource, load_media, settings, source_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class FeatureCache:
    """``get(modality, source) -> [n_out, D]``: read from disk, or preprocess + encode + store on a miss.

    ``encoder`` is a ``toollmm.model.encoder.ImageBindEncoder`` (anything with ``identity``, ``output``,
    ``preprocess``, ``out_dim``, ``outputs_per_input`` and ``encode``). Counters: ``hits``, ``misses``,
    ``writes``, ``forwards`` (encoder calls).
    """

    def __init__(self, root: str | os.PathLike, encoder, batch_size: int = 16):
        self.root = Path(root)
        self.encoder = encoder
        self.batch_size = batch_size
        self.hits = self.misses = self.writes = self.forwards = 0
        self._hash_memo: dict[tuple, str] = {}

    @classmethod
    def from_config(cls, cfg: FeatureCacheConfig, encoder, **kwargs) -> FeatureCache:
        return cls(resolve(cfg.dir), encoder, **kwargs)

    @property
    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes}

    # ------------------------------------------------------------------------------------- keys
    def content_sha256(self, source: VideoSource) -> str:
        """sha256 of the media bytes (a frame list hashes its frames' hashes, in order)."""
        if isinstance(source, bytes):
            return hashlib.sha256(source).hexdigest()
        if isinstance(source, (list, tuple)):
            parts = "\n".join(self.content_sha256(p) for p in source)
            return hashlib.sha256(f"frames:{len(source)}\n{parts}".encode()).hexdigest()
        path = os.path.abspath(os.fspath(source))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise MediaError(path, "file not found") from None
        memo = (path, st.st_size, st.st_mtime_ns)
        if memo not in self._hash_memo:
            self._hash_memo[memo] = sha256_file(path)
        return self._hash_memo[memo]

    def key(self, modality: str, source: VideoSource) -> str:
        blob = {
            "format": FORMAT_VERSION,
            "modality": modality,
            "content": self.content_sha256(source),
            "encoder": self.encoder.identity,
            "output": self.encoder.output,
            "preprocess": settings(modality, self.encoder.preprocess),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def path(self, modality: str, key: str) -> Path:
        enc = self.encoder
        return self.root / enc.identity / enc.output / modality / key[:2] / f"{key}.safetensors"

    # ------------------------------------------------------------------------------------ reads
    def _read(self, modality: str, key: str) -> torch.Tensor | None:
        path = self.path(modality, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        want = (self.encoder.outputs_per_input(modality), self.encoder.out_dim)
        try:
            feats = st_load(data)["features"]
        except (SafetensorError, KeyError, ValueError) as e:
            log.warning("feature cache: %s unreadable (%s); re-encoding", path, e)
            return None
        if tuple(feats.shape) != want:
            log.warning(
                "feature cache: %s has shape %s, expected %s; re-encoding", path, tuple(feats.shape), want
            )
            return None
        return feats

    def _write(self, modality: str, key: str, feats: torch.Tensor, name: str) -> None:
        meta = {"modality": modality, "source": name, "encoder": self.encoder.identity, "key": key}
        data = safetensors_bytes({"features": feats.detach().to("cpu", torch.float32).contiguous()}, meta)
        atomic_write_bytes(self.path(modality, key), data)
        self.writes += 1

    def exists(self, modality: str, key: str) -> bool:
        """Whether an entry for ``key`` is on disk (not read or validated)."""
        return self.path(modality, key).is_file()

    def lookup(self, modality: str, source: VideoSource) -> torch.Tensor | None:
        """Cached features or None; never encodes and does not count."""
        return self._read(modality, self.key(modality, source))

    # ------------------------------------------------------------------------------------- gets
    def get(self, modality: str, source: VideoSource, name: str | None = None) -> torch.Tensor:
        return self.get_many(modality, [source], [name] if name else None)[0]

    def get_many(
        self, modality: str, sources: Sequence[VideoSource], names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``[len(sources), n_out, D]``; misses are preprocessed and encoded in batches of ``batch_size``.
        A bad input raises ``MediaError`` naming it (``names[i]`` when given, else its path)."""
        names = list(names) if names else [source_name(s) for s in sources]
        keys = [self.key(modality, s) for s in sources]
        out: list[torch.Tensor | None] = [self._read(modality, k) for k in keys]
        todo = [i for i, f in enumerate(out) if f is None]
        self.hits += len(sources) - len(todo)
        self.misses += len(todo)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            pixels = torch.stack(
                [load_media(modality, sources[i], self.encoder.preprocess, names[i]) for i in chunk]
            )
            feats = self.encoder.encode(modality, pixels).cpu()
            self.forwards += 1
            for j, i in enumerate(chunk):
                out[i] = feats[j].clone()
                self._write(modality, keys[i], out[i], names[i])
        if not out:
            n = self.encoder.outputs_per_input(modality)
            return torch.empty(0, n, self.encoder.out_dim)
        return torch.stack(out)
