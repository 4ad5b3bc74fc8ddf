"""The shard format: one sample <-> its tar members, and byte-span indexing of tar files.

Layout of one sample (key ``000000042``, webdataset's ``key.ext`` member naming)::

    000000042.record.json       the unified record, unchanged (its media paths kept for provenance)
    000000042.media.json        manifest: {"image": [{"file": "image.0.png"}], "video": [{"frames": [...]}],
                                "audio": [{"features": "audio.0.feat.npy"}], "captions": {"0": "caption.0.npy"}}
    000000042.image.0.png       media bytes (or ``<modality>.<i>.feat.npy``: cached encoder features)
    000000042.caption.0.npy     decoder caption embedding of the record's generate target 0 (text->X)
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .records import (
    MEDIA_KEYS,
    BadSample,
    Media,
    Sample,
    ensure_trainable,
    load_caption,
    parse_record,
    where_of,
)

FeatureFn = Callable[[str, Media, Sample], "np.ndarray | None"]  # (modality, medium, sample) -> features


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _suffix(name: str) -> str:
    return Path(name).suffix.lstrip(".").lower() or "bin"


def sample_to_members(sample: Sample, features: FeatureFn | None = None) -> dict[str, bytes]:
    """The tar members (ext -> bytes) that store ``sample``."""
    members: dict[str, bytes] = {"record.json": json.dumps(sample.record, ensure_ascii=False).encode()}
    manifest: dict = {}
    for modality, items in sample.media.items():
        entries = []
        for i, m in enumerate(items):
            feats = features(modality, m, sample) if features is not None else None
            if feats is not None:
                members[ext := f"{modality}.{i}.feat.npy"] = _npy(np.asarray(feats))
                entries.append({"features": ext})
            elif isinstance(m.data, list):
                frames = sample.record[MEDIA_KEYS[modality]][i]
                names = [f"{modality}.{i}.f{j}.{_suffix(frames[j])}" for j in range(len(m.data))]
                members.update(zip(names, m.data))
                entries.append({"frames": names})
            else:
                members[ext := f"{modality}.{i}.{_suffix(m.name)}"] = m.data
                entries.append({"file": ext})
        manifest[modality] = entries
    if sample.captions:
        manifest["captions"] = {}
        for j, arr in sorted(sample.captions.items()):
            members[ext := f"caption.{j}.npy"] = _npy(np.asarray(arr, dtype=np.float32))
            manifest["captions"][str(j)] = ext
    members["media.json"] = json.dumps(manifest).encode()
    return members


def _load_npy(data: bytes, where: str, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for damaged files
        raise BadSample("corrupt_media", where, f"{name}: unreadable features ({e})") from None


def members_to_sample(members: dict[str, bytes], where: str, source: str = "") -> Sample:
    """Inverse of :func:`sample_to_members`; raises :class:`BadSample` naming the shard and key."""
    if "record.json" not in members:
        raise BadSample("malformed_json", where, "no record.json member (not a toollmm shard?)")
    record = parse_record(members["record.json"], where)
    where = where_of(where, record)
    ensure_trainable(record, where)
    manifest = parse_record(members.get("media.json", b"{}"), where + " media.json")

    def get(ext: str) -> bytes:
        if ext not in members:
            raise BadSample("missing_media", where, f"shard member {ext!r} is missing")
        return members[ext]

    media: dict[str, list[Media]] = {}
    for modality, key in MEDIA_KEYS.items():
        names = record.get(key) or []
        entries = manifest.get(modality, [])
        if len(entries) != len(names):
            raise BadSample("missing_media", where, f"{len(names)} {modality}s listed, {len(entries)} stored")
        out = []
        for name, e in zip(names, entries):
            if "features" in e:
                out.append(Media(str(name), features=_load_npy(get(e["features"]), where, e["features"])))
            elif "frames" in e:
                out.append(Media(str(name), data=[get(f) for f in e["frames"]]))
            else:
                out.append(Media(str(name), data=get(e["file"])))
        if out:
            media[modality] = out
    captions = {int(j): load_caption(get(ext), where, ext) for j, ext in manifest.get("captions", {}).items()}
    return Sample(record, where, source, media, captions)


def _key(name: str) -> str:
    head, _, base = name.rpartition("/")
    return (head + "/" if head else "") + base.split(".", 1)[0]


def index_tar(path: Path) -> tuple[list[str], np.ndarray]:
    """Keys and ``[start, end)`` byte spans of every sample in a tar (members grouped by key)."""
    keys: list[str] = []
    spans: list[list[int]] = []
    with tarfile.open(path, "r:") as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            end = ti.offset_data + -(-ti.size // 512) * 512
            k = _key(ti.name)
            if keys and keys[-1] == k:
                spans[-1][1] = end
            else:
                keys.append(k)
                spans.append([ti.offset, end])
    return keys, np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def read_span(path: Path, start: int, end: int) -> dict[str, bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        blob = f.read(end - start)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
        for ti in tf:
            if ti.isfile():
                out[ti.name.split(".", 1)[1] if "." in ti.name else ""] = tf.extractfile(ti).read()
    return out
