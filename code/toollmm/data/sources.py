"""Indexed, random-access training sources: a JSONL file + media root, or a folder of shards.

A source knows its length up front (from an index built once: line offsets for JSONL, the shard index
for tar shards), and ``load(i)`` returns item ``i`` as a :class:`Sample` with its media bytes in memory,
or raises :class:`BadSample`. Random access is what makes the stream's order exact for a seed,
splittable across ranks and workers, and resumable without replaying data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from toollmm.core.paths import resolve
from toollmm.data.captions import CaptionStore, caption_key

from .records import (
    MEDIA_KEYS,
    BadSample,
    Media,
    Sample,
    ensure_trainable,
    generate_targets,
    parse_record,
    where_of,
)

log = logging.getLogger(__name__)


class Source(Protocol):
    name: str

    def __len__(self) -> int: ...

    def load(self, i: int) -> Sample: ...


def index_jsonl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-blank lines of ``path``."""
    offsets, lines = [], []
    pos = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                offsets.append(pos)
                lines.append(n)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64)


def read_media(record: dict, root: Path, where: str) -> dict[str, list[Media]]:
    """Bytes of every medium the record lists, resolved against ``root`` (a missing file names itself)."""

    def read(rel: str) -> bytes:
        p = Path(rel) if os.path.isabs(rel) else root / rel
        try:
            return p.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BadSample("missing_media", where, f"{p} does not exist") from None

    out: dict[str, list[Media]] = {}
    for modality, key in MEDIA_KEYS.items():
        items = record.get(key) or []
        if items:
            out[modality] = [
                Media(name=str(x), data=[read(f) for f in x] if isinstance(x, list) else read(x))
                for x in items
            ]
    return out


def store_captions(record: dict, store: CaptionStore | None, where: str) -> dict:
    """Caption embeddings referenced by ``generate[].embedding`` keys, from the store (when one is set)."""
    out = {}
    if store is None:
        return out
    for j, g in enumerate(generate_targets(record)):
        key = g.get("embedding")
        if key is None and "caption" in g and g.get("modality") in store.decoder_ids:
            key = caption_key(g["caption"], store.decoder_ids[g["modality"]])
        if key is not None:
            out[j] = store.get(key, where)
    return out


class JsonlSource:
    """Unified records, one per line; media paths relative to ``media_root`` (default: the file's folder)."""

    def __init__(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        media_root: str | os.PathLike | None = None,
        captions: CaptionStore | None = None,
    ):
        self.path = resolve(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data source {self.path} does not exist")
        self.name = name or self.path.stem
        self.media_root = resolve(media_root) if media_root else self.path.parent
        self.captions = captions
        self.offsets, self.lines = index_jsonl(self.path)
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):  # open file handles do not cross into DataLoader workers
        return {**self.__dict__, "_fh": None, "_pid": None}

    def _file(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 - kept open for reuse
        return self._fh

    def load(self, i: int) -> Sample:
        f = self._file()
        f.seek(int(self.offsets[i]))
        where = f"{self.path}:{int(self.lines[i])}"
        record = parse_record(f.readline(), where, offset=int(self.offsets[i]))
        where = where_of(where, record)
        ensure_trainable(record, where)
        media = read_media(record, self.media_root, where)
        return Sample(record, where, self.name, media, store_captions(record, self.captions, where))


def is_shard_folder(path: Path | str) -> bool:
    s = str(path)
    return "{" in s or s.endswith(".tar") or (Path(s).is_dir())


def open_source(src, captions_dir: str | None = None, decoder_ids: dict | None = None) -> Source:
    """Build the source a ``SourceConfig`` describes (JSONL file, or shard folder / brace pattern).
    ``decoder_ids``: targets without an ``embedding`` key are found in the store by caption."""
    from .shards import ShardSource

    store = CaptionStore(resolve(captions_dir), decoder_ids) if captions_dir else None
    p = resolve(src.path)
    if p is not None and is_shard_folder(p):
        return ShardSource(src.path, name=src.name, captions=store)
    return JsonlSource(p, name=src.name, media_root=src.media_root, captions=store)
