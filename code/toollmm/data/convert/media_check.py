"""``convert --check-media``: decode every medium the converted records reference, before a long run does.

Each distinct file (or frame list) goes through the encoder's own preprocessing (``load_media``: the full
decode a training step would do) in a pool of worker processes. A file that fails gets a short reason
(``missing file``, ``empty file``, ``not a readable image``, ``audio too short``, ``no video stream``, ...);
the caller raises naming every bad file, or drops the records that use one and counts them per reason.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..records import MEDIA_KEYS

Progress = Callable[[int, int, int], None]  # (checked, total, bad)


@dataclass
class MediaReport:
    """What the check found: ``bad`` maps each bad file to ``(modality, reason)``."""

    checked: int = 0
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def counts(self) -> Counter:
        return Counter(reason for _, reason in self.bad.values())

    def lines(self, limit: int = 50) -> list[str]:
        """Per-reason counts, then each bad file (the first ``limit``)."""
        out = [f"{n} x {reason}" for reason, n in self.counts.most_common()]
        items = sorted(self.bad.items())
        out += [f"{path}: {modality}: {reason}" for path, (modality, reason) in items[:limit]]
        if len(items) > limit:
            out.append(f"(and {len(items) - limit} more bad files)")
        return out


def media_of(record: dict, root: Path) -> list[tuple[str, str | tuple[str, ...]]]:
    """``[(modality, absolute path or tuple of frame paths)]`` of one record."""

    def absolute(p: str) -> str:
        return p if os.path.isabs(p) else str(root / p)

    out = []
    for modality, key in MEDIA_KEYS.items():
        for item in record.get(key) or []:
            out.append((modality, tuple(map(absolute, item)) if isinstance(item, list) else absolute(item)))
    return out


def _short(reason: str) -> str:
    return reason.split(" (", 1)[0]


def check_one(job: tuple[str, str | tuple[str, ...]]) -> str | None:
    """The reason ``job``'s medium cannot train, or None (runs in a worker process)."""
    from toollmm.core.config import PreprocessConfig
    from toollmm.data.preprocess import MediaError, load_media

    modality, src = job
    paths = list(src) if isinstance(src, tuple) else [src]
    for p in paths:
        if not os.path.isfile(p):
            return "missing file"
        if os.path.getsize(p) == 0:
            return "empty file"
    try:
        load_media(modality, paths if isinstance(src, tuple) else src, PreprocessConfig())
    except MediaError as e:
        return _short(e.reason)
    except Exception as e:  # a decoder library's own failure on hostile bytes is still a bad file
        return f"not a readable {modality} ({type(e).__name__})"
    return None


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def check_media(
    records: list[dict], root: Path, workers: int = 0, progress: Progress | None = None
) -> MediaReport:
    """Decode every distinct medium of ``records`` (paths relative to ``root``) with ``workers``
    processes (0: one per CPU, at most 8); ``progress(checked, total, bad)`` about once a second."""
    jobs = sorted({m for rec in records for m in media_of(rec, root)}, key=str)
    report = MediaReport()
    t0 = last = time.perf_counter()
    workers = workers or min(8, os.cpu_count() or 1)
    if not jobs:
        return report
    from .. import preprocess  # noqa: F401 - imported once here, inherited by forked workers

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_init_worker) as pool:
        for job, reason in zip(jobs, pool.map(check_one, jobs, chunksize=8)):
            report.checked += 1
            if reason is not None:
                name = job[1] if isinstance(job[1], str) else f"{job[1][0]} (+{len(job[1]) - 1} frames)"
                report.bad[name] = (job[0], reason)
            now = time.perf_counter()
            if progress is not None and (now - last >= 1.0 or report.checked == len(jobs)):
                progress(report.checked, len(jobs), len(report.bad))
                last = now
    report.seconds = time.perf_counter() - t0
    return report


def bad_record_reason(record: dict, root: Path, report: MediaReport) -> str | None:
    """The reason of the first bad medium ``record`` uses, or None."""
    for _, src in media_of(record, root):
        name = src if isinstance(src, str) else f"{src[0]} (+{len(src) - 1} frames)"
        if name in report.bad:
            return report.bad[name][1]
    return None
