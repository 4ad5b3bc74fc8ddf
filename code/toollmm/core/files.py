"""Small file helpers shared by the encoder and the feature cache: hashing, atomic writes, file modes.

Files we write get the mode an ordinary ``open()`` would give them (0666 minus the umask, e.g. 0644):
``tempfile.mkstemp`` and safetensors' writer create 0600, which teammates on a shared filesystem cannot
read; :func:`respect_umask` puts such files right after they are written."""

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


def current_umask() -> int:
    """The process umask (read from /proc where it can be, without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # no /proc: the only portable way to read it is to set it (and put it back)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode of a new regular file under the current umask (0644 under the usual 022)."""
    return 0o666 & ~current_umask()


def respect_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode a plain ``open()`` would have
    given it; executable bits are kept (masked by the umask too)."""
    p = Path(path)
    files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file() and not q.is_symlink()]
    mask = current_umask()
    for f in files:
        mode = (0o666 | (f.stat().st_mode & 0o111)) & ~mask
        os.chmod(f, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one, never a part:
    a temp file in the same folder, flushed and fsynced, then ``os.replace`` (atomic on POSIX and
    Windows). Concurrent writers of the same path are safe: the last rename wins with whole content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp creates 0600
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
