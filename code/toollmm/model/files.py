"""Small file helpers shared by the encoder and the feature cache: hashing and atomic writes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one, never a part:
    a temp file in the same folder, flushed and fsynced, then ``os.replace`` (atomic on POSIX and
    Windows). Concurrent writers of the same path are safe: the last rename wins with whole content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def sha256_memoised(path: str | os.PathLike, memo: str | os.PathLike) -> str:
    """sha256 of a (large) file, remembered in the JSON file ``memo`` under the file's absolute path
    and reused while its size and mtime are unchanged (hashing imagebind_huge.pth takes ~10 s)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = Path(memo)
    try:
        table = json.loads(memo.read_text())
    except (FileNotFoundError, ValueError):
        table = {}
    entry = table.get(str(path))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    log.info("hashing %s (%.1f MB), remembered in %s", path, st.st_size / 1e6, memo)
    digest = sha256_file(path)
    table[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        atomic_write_bytes(memo, json.dumps(table, indent=1, sort_keys=True).encode())
    except OSError as e:  # a read-only checkout still works, it just hashes again next time
        log.warning("could not write the hash memo %s: %s", memo, e)
    return digest
