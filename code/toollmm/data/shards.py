"""webdataset tar shards of unified records: writer, index, random-access reader, ``prepare_data.py shard``.

Layout of one sample (key ``000000042``, webdataset's ``key.ext`` member naming)::

    000000042.record.json       the unified record, unchanged (its media paths kept for provenance)
    000000042.media.json        manifest: {"image": [{"file": "image.0.png"}], "video": [{"frames": [...]}],
                                "audio": [{"features": "audio.0.feat.npy"}], "captions": {"0": "caption.0.npy"}}
    000000042.image.0.png       media bytes (or ``<modality>.<i>.feat.npy``: cached encoder features)
    000000042.caption.0.npy     decoder caption embedding of the record's generate target 0 (text->X)

``index.json`` in the folder lists the shards and per-shard ``.idx.npy`` byte spans of every sample, so a
reader seeks straight to sample ``i`` (shards without an index are scanned once). Any webdataset reader
still streams these tars as usual.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..paths import resolve
from .captions import CaptionStore
from .records import (
    MEDIA_KEYS,
    BadSample,
    Media,
    Sample,
    generate_targets,
    load_caption,
    parse_record,
    validate_record,
    where_of,
)

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "toollmm-shards"
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
    validate_record(record, where)
    manifest = parse_record(members.get("media.json", b"{}"), where + " media.json")

    def get(ext: str) -> bytes:
        if ext not in members:
            raise BadSample("missing_media", where, f"shard member {ext!r} is missing")
        return members[ext]

    media: dict[str, list[Media]] = {}
    for modality in ("image", "video", "audio"):
        names = record.get(MEDIA_KEYS[modality]) or []
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


# --------------------------------------------------------------------------------------------- index
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


def _shard_files(path: Path | str) -> list[Path]:
    s = str(path)
    if "{" in s:
        import braceexpand

        return [Path(p) for p in braceexpand.braceexpand(s)]
    p = Path(s)
    if p.is_file():
        return [p]
    if (p / INDEX).is_file():
        return [p / s["file"] for s in json.loads((p / INDEX).read_text())["shards"]]
    files = sorted(p.glob("*.tar"))
    if not files:
        raise FileNotFoundError(f"no shards in {p} (expected {INDEX} or *.tar)")
    return files


class ShardSource:
    """Random access to the samples of a shard folder, brace pattern or single tar."""

    def __init__(
        self, path: str | os.PathLike, name: str | None = None, captions: CaptionStore | None = None
    ):
        root = resolve(path)
        self.files = _shard_files(root)
        self.name = name or Path(str(root).split("{")[0].rstrip("/-_")).name
        self.captions = captions
        spans, owner = [], []
        for i, f in enumerate(self.files):
            idx = f.with_suffix(".idx.npy")
            s = np.load(idx) if idx.is_file() else index_tar(f)[1]
            spans.append(s)
            owner.append(np.full(len(s), i, dtype=np.int64))
        self.spans = np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)
        self.owner = np.concatenate(owner) if owner else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.spans)

    def load(self, i: int) -> Sample:
        f = self.files[int(self.owner[i])]
        start, end = (int(x) for x in self.spans[i])
        where = f"{f}@{start}"
        try:
            members = read_span(f, start, end)
        except (OSError, tarfile.TarError) as e:
            raise BadSample("malformed_json", where, f"unreadable shard span: {e}") from None
        sample = members_to_sample(members, where, self.name)
        if self.captions is not None:
            for j, g in enumerate(generate_targets(sample.record)):
                if j not in sample.captions and "embedding" in g:
                    sample.captions[j] = self.captions.get(g["embedding"], sample.where)
        return sample


def iter_samples(path: str | os.PathLike):
    """Every sample of a shard folder in order, with media bytes in memory."""
    src = ShardSource(path)
    for i in range(len(src)):
        yield src.load(i)


# --------------------------------------------------------------------------------------------- writer
def write_shards(
    source,
    output: str | os.PathLike,
    shard_size: int = 1000,
    *,
    shard_bytes: float = 3e9,
    features: FeatureFn | None = None,
    on_error: str = "raise",
    overwrite: bool = False,
) -> dict:
    """Write every sample of ``source`` (a :class:`~toollmm.data.sources.Source`) into
    ``output/shard-%06d.tar`` (``shard_size`` samples or ``shard_bytes`` per shard) plus the index.

    Bad samples raise naming file and record, or are counted per reason under ``on_error="skip"``.
    Returns ``{"written": n, "shards": k, "skipped": {reason: n}}``.
    """
    import webdataset as wds

    out = Path(resolve(output))
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*.tar")) + sorted(out.glob("shard-*.idx.npy")) + list(out.glob(INDEX))
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({old[0].name}, ...); pass --overwrite to replace them"
        )
    for f in old:
        f.unlink()
    written, skipped = 0, Counter()
    shards: list[dict] = []

    def finished(fname: str) -> None:
        keys, spans = index_tar(Path(fname))
        np.save(Path(fname).with_suffix(".idx.npy"), spans)
        shards.append({"file": Path(fname).name, "count": len(keys)})

    with wds.ShardWriter(
        str(out / "shard-%06d.tar"),
        maxcount=shard_size,
        maxsize=shard_bytes,
        post=finished,
        verbose=0,
        mtime=0,
    ) as sink:
        for i in range(len(source)):
            try:
                sample = source.load(i)
                members = sample_to_members(sample, features)
            except BadSample as e:
                if on_error != "skip":
                    raise
                skipped[e.reason] += 1
                log.warning("skipped %s", e)
                continue
            sink.write({"__key__": f"{written:09d}", **members})
            written += 1
    shards = [s for s in shards if s["count"]]
    for f in out.glob("shard-*.tar"):  # ShardWriter opens a last, empty shard when the count divides evenly
        if f.name not in {s["file"] for s in shards}:
            f.unlink()
            f.with_suffix(".idx.npy").unlink(missing_ok=True)
    index = {"format": FORMAT, "version": 1, "num_samples": written, "shards": shards}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)
    summary = {"written": written, "shards": len(shards), "skipped": dict(skipped)}
    log.info(
        "wrote %d samples in %d shards to %s; skipped %s", written, len(shards), out, dict(skipped) or "none"
    )
    return summary


def add_shard_args(subparsers) -> argparse.ArgumentParser:
    """Register ``shard`` on ``prepare_data.py``'s subparsers (the lead wires this in)."""
    p = subparsers.add_parser(
        "shard",
        help="unified JSONL + media -> webdataset tar shards with an index",
        description="Write webdataset shards holding each record, its media bytes and caption embeddings.",
    )
    p.add_argument("--input", required=True, help="unified-record JSONL (output of `convert`)")
    p.add_argument("--output", required=True, help="shard folder, e.g. data/shards/NAME/")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--shard-bytes", type=float, default=3e9, help="bytes per shard at most (default 3e9)")
    p.add_argument(
        "--media-root", default=None, help="folder media paths are relative to (default: input's folder)"
    )
    p.add_argument(
        "--captions",
        default=None,
        help="caption-embedding store written by `embed-captions` (copied into shards)",
    )
    p.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="bad record: stop, or skip and count"
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    p.set_defaults(func=main_shard)
    return p


def main_shard(args: argparse.Namespace) -> int:
    """``prepare_data.py shard``: validate, read media, write shards; log the summary; exit code 0."""
    from .sources import JsonlSource

    store = CaptionStore(resolve(args.captions)) if args.captions else None
    src = JsonlSource(args.input, media_root=args.media_root, captions=store)
    summary = write_shards(
        src,
        args.output,
        args.shard_size,
        shard_bytes=args.shard_bytes,
        on_error=args.on_error,
        overwrite=args.overwrite,
    )
    log.info("shard summary: %s", json.dumps(summary))
    return 0
