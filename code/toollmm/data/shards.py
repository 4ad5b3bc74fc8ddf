"""webdataset tar shards of unified records: writer and random-access reader (``prepare_data.py shard``).

A shard folder holds ``shard-%06d.tar`` files (format: ``toollmm.data.shardfmt``), one ``.idx.npy`` per
shard with the byte span of every sample, and ``index.json`` listing the shards, so a reader seeks straight
to sample ``i`` (shards without an index are scanned once). Any webdataset reader still streams the tars.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from toollmm.core.errors import read_text
from toollmm.core.paths import resolve
from toollmm.data.captions import CaptionStore

from .records import BadSample, Sample, generate_targets
from .shardfmt import FeatureFn, index_tar, members_to_sample, read_span, sample_to_members

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "toollmm-shards"


def _shard_files(path: Path | str) -> list[Path]:
    s = str(path)
    if "{" in s:
        import braceexpand

        return [Path(p) for p in braceexpand.braceexpand(s)]
    p = Path(s)
    if p.is_file():
        return [p]
    if (p / INDEX).is_file():
        try:
            return [p / s["file"] for s in json.loads(read_text(p / INDEX))["shards"]]
        except (ValueError, KeyError, TypeError) as e:  # NotUtf8 is a ValueError and names itself
            raise BadSample(
                "malformed_json", str(p / INDEX), f"not a shard index ({type(e).__name__}: {e})"
            ) from None
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
