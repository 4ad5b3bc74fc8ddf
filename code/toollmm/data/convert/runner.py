"""Read a source file, convert every record, validate, write unified JSONL, count what happened."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from toollmm.core.errors import NotUtf8, iter_text_lines, read_text

from ..records import validate_record
from .base import REGISTRY, Context, ConversionError
from .media_check import MediaReport, Progress, bad_record_reason
from .media_check import check_media as decode_media

log = logging.getLogger(__name__)


@dataclass
class ConvertStats:
    """What a conversion did; ``skipped`` counts per reason, ``examples`` names one record per reason."""

    fmt: str
    input: str
    output: str
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    renamed_ids: int = 0
    seconds: float = 0.0
    validate_seconds: float = 0.0
    media: MediaReport | None = None  # --check-media

    @property
    def records_per_s(self) -> float:
        return self.read / self.seconds if self.seconds > 0 else float("inf")

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)

    def summary(self) -> str:
        lines = [
            f"{self.fmt}: {self.input} -> {self.output}",
            f"  records read {self.read}, written {self.written}, skipped {sum(self.skipped.values())}",
        ]
        for reason, n in self.skipped.most_common():
            lines.append(f"    {n} x {reason} (first: {self.examples[reason]})")
        if self.media is not None:
            m = self.media
            lines.append(f"  media decoded {m.checked} ({len(m.bad)} bad) in {m.seconds:.1f} s")
            lines += [f"    {line}" for line in m.lines()]
        if self.renamed_ids:
            lines.append(f"  {self.renamed_ids} duplicate id(s) renamed '<id>#<n>'")
        lines.append(
            f"  {self.seconds:.2f} s, {self.records_per_s:,.0f} records/s"
            f" ({self.validate_seconds:.2f} s of it validating)"
        )
        return "\n".join(lines)


def _fail_reason(err: Exception, where: str) -> str:
    msg = str(err)
    if msg.startswith(where + ": "):
        msg = msg[len(where) + 2 :]
    return msg if len(msg) <= 100 else msg[:97] + "..."


def iter_source(path: Path) -> Iterator[tuple[str, object]]:
    """Yield ``(where, raw)`` for each record of a JSON array or JSONL file. A malformed or non-UTF-8
    JSONL line, or an array record holding bytes that are not UTF-8, yields ``(where, ConversionError)``
    so the caller can raise or skip it; a malformed JSON array raises."""
    with open(path, "rb") as f:
        head = f.readline()
    first = head.decode("utf-8", errors="replace").strip()
    jsonl = path.suffix == ".jsonl"
    if not jsonl and first.startswith("{"):
        try:
            jsonl = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            jsonl = False
    if jsonl:
        for n, line in iter_text_lines(path):
            where = f"{path}:line {n}"
            if isinstance(line, NotUtf8):
                where = f"{where} (byte offset {line.offset})"
                yield where, ConversionError(f"{where}: not UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    where,
                    ConversionError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})"),
                )
        return
    data = path.read_bytes()
    text = data.decode("utf-8", errors="surrogateescape")  # bad bytes -> lone surrogates, found per record
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    if not isinstance(data, list):
        if _SURROGATE.search(text):
            read_text(path)  # raises NotUtf8 naming line and byte offset
        raise ConversionError(
            f"{path}: expected a JSON array of records or JSONL, got a JSON {type(data).__name__}"
        )
    for i, raw in enumerate(data):
        where = f"{path}:record {i}"
        bad = _undecoded(raw, "")
        if bad is not None:
            where = f"{where} ({bad or 'the record'})"
            yield where, ConversionError(f"{where}: not UTF-8 text")
            continue
        yield where, raw


_SURROGATE = re.compile("[\udc80-\udcff]")


def _undecoded(value: object, at: str) -> str | None:
    """Where in a parsed value a string holds undecodable bytes (as surrogate escapes), else None."""
    stack = [(value, at)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return at
        elif isinstance(v, dict):
            for k, x in reversed(v.items()):
                if _SURROGATE.search(k):
                    return at
                stack.append((x, f"{at}.{k}" if at else k))
        elif isinstance(v, list):
            stack.extend((x, f"{at}[{j}]") for j, x in reversed(list(enumerate(v))))
    return None


def convert_records(fmt: str, path: Path, ctx: Context, on_error: str, stats: ConvertStats) -> Iterator[dict]:
    """Converted (not yet validated) records, with bad source records raised or counted."""
    spec = REGISTRY[fmt]
    for index, (where, raw) in enumerate(iter_source(path)):
        stats.read += 1
        ctx.where, ctx.index = where, index
        try:
            if isinstance(raw, Exception):
                raise raw
            out = spec.convert(raw, ctx)
        except ConversionError as e:
            if on_error == "raise":
                raise
            stats.skip(_fail_reason(e, where), where)
            continue
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            err = ConversionError(f"{where}: {type(e).__name__}: {e}")
            if on_error == "raise":
                raise err from e
            stats.skip(_fail_reason(err, where), where)
            continue
        for rec in out:
            rec.setdefault("meta", {})
            rec["meta"].setdefault("origin", where.rsplit(":", 1)[-1])
            if not rec["meta"]:
                del rec["meta"]
            yield rec


def convert_file(
    fmt: str,
    input: str | os.PathLike,
    output: str | os.PathLike,
    media_root: str | os.PathLike | None = None,
    on_error: str = "raise",
    options: dict[str, str] | None = None,
    source: str | None = None,
    check_media: bool = False,
    media_workers: int = 0,
    progress: Progress | None = None,
) -> ConvertStats:
    """Convert one source file into unified JSONL. Every written record passes the schema validator.

    ``on_error='raise'`` stops at the first bad record with an error naming file and record;
    ``'skip'`` drops it and counts it per reason. Ids are made unique within the output.
    ``check_media`` decodes every referenced medium (``media_workers`` processes; paths relative to
    ``media_root``, else the input's folder): a bad one raises naming every bad file, or under ``'skip'``
    drops the records that use it, counted per reason."""
    if fmt not in REGISTRY:
        raise ConversionError(f"unknown format {fmt!r}; known: {', '.join(sorted(REGISTRY))}")
    if on_error not in ("raise", "skip"):
        raise ConversionError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    spec = REGISTRY[fmt]
    options = dict(options or {})
    allowed = set(spec.options) | {"task"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConversionError(f"format {fmt!r} has no option(s) {unknown}; known: {sorted(allowed)}")
    path, out_path = Path(input), Path(output)
    if not path.is_file():
        raise ConversionError(f"input file not found: {path}")
    ctx = Context(
        path=path,
        fmt=fmt,
        source=source or f"{fmt}/{path.stem}",
        options=options,
        media_root=Path(media_root) if media_root else None,
    )
    stats = ConvertStats(fmt, str(path), str(out_path))
    t0 = time.perf_counter()
    records: Iterator[dict] | list[dict] = convert_records(fmt, path, ctx, on_error, stats)
    if spec.finish is not None:
        ctx.where = str(path)
        records = spec.finish(list(records), ctx)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    seen: Counter = Counter()
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                where = f"{path}:{rec.get('meta', {}).get('origin', '?')}"
                seen[rec["id"]] += 1
                if seen[rec["id"]] > 1:
                    rec["id"] = f"{rec['id']}#{seen[rec['id']]}"
                    stats.renamed_ids += 1
                tv = time.perf_counter()
                problems = validate_record(rec, where="")
                stats.validate_seconds += time.perf_counter() - tv
                if problems:
                    if on_error == "raise":
                        raise ConversionError(f"{where}: converted record is invalid: {'; '.join(problems)}")
                    stats.skip(f"schema: {problems[0]}"[:100], where)
                    continue
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats.written += 1
        if check_media:
            _check_media(tmp, path, ctx.media_root or path.parent, on_error, stats, media_workers, progress)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    stats.seconds = time.perf_counter() - t0
    log.info("converted %s: %d read, %d written", path, stats.read, stats.written)
    return stats


def _check_media(
    tmp: Path, path: Path, root: Path, on_error: str, stats: ConvertStats, workers, progress
) -> None:
    """Decode the media of the records in ``tmp``; raise naming every bad file, or drop their records."""
    records = [json.loads(line) for line in tmp.read_text(encoding="utf-8").splitlines()]
    report = stats.media = decode_media(records, root, workers, progress)
    if not report.bad:
        return
    if on_error == "raise":
        raise ConversionError(
            f"{path}: --check-media: {len(report.bad)} of {report.checked} media files under {root} cannot "
            "be decoded (--on-error skip drops their records):\n" + "\n".join(report.lines())
        )
    keep = []
    for rec in records:
        reason = bad_record_reason(rec, root, report)
        if reason is None:
            keep.append(rec)
            continue
        stats.skip(f"media: {reason}", f"{path}:{rec.get('meta', {}).get('origin', '?')} (id={rec['id']})")
        stats.written -= 1
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
