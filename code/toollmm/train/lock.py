"""One training run per stage folder: an exclusive ``flock`` on ``<stage folder>/train.lock``.

Two runs writing one stage folder clobber each other (the later one silently replaces the other's
weights, ``metrics.jsonl`` interleaves both, or one dies on the other's half-renamed checkpoint). Rank 0
takes the lock before any rank writes and holds it until every rank has finished; a second run is
refused at once, naming the holder (host, pid, start time and command, written into the lock file).

The lock is the kernel's ``flock``, not the file's existence: it goes when the holding process exits,
however it exits (``kill -9`` included), so a crash never leaves a stale lock. Forked children (DataLoader
workers) close their inherited copy at once, so the lock lives exactly as long as the process that took
it. The file itself stays (an empty or stale content means nothing without the lock). On a shared
filesystem the lock is as good as its ``flock`` (NFSv4 and Lustre implement it; check yours).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
_HELD: set[int] = set()  # file descriptors of the locks this process holds


class StageLockedError(RuntimeError):
    """The stage folder is being written by another run (the message names it)."""


def _close_in_child() -> None:
    """After a fork the child shares the parent's lock; drop the child's reference so the lock dies
    with the process that took it (a surviving DataLoader worker must not keep it alive)."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder_text(fd: int) -> str:
    """What the holder wrote into the lock file (it writes right after locking: wait briefly for it)."""
    raw = b""
    for _ in range(20):
        raw = os.pread(fd, 65536, 0)
        if raw.strip():
            break
        time.sleep(0.05)
    try:
        h = json.loads(raw.decode("utf-8"))
        cmd = f", command {h['command']!r}" if h.get("command") else ""
        return f"host {h.get('host')}, pid {h.get('pid')}, started {h.get('started')}{cmd}"
    except (ValueError, UnicodeDecodeError, AttributeError):
        return "holder unknown (the lock file names none)"


class StageLock:
    """Exclusive lock on one stage folder; ``acquire`` raises :class:`StageLockedError` when another
    process holds it. Also a context manager."""

    def __init__(self, stage_dir: str | os.PathLike):
        self.stage_dir = Path(stage_dir)
        self.path = self.stage_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StageLock:
        if self._fd is not None:
            return self
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise StageLockedError(
                f"{self.stage_dir} is in use by another training run ({holder}); two runs on one stage "
                "folder overwrite each other's weights and logs. Wait for it to finish or stop it (a killed "
                "run releases the lock by itself), or train into another folder (run.name=... or "
                f"run.output_root=...). Lock file: {self.path}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        _HELD.add(fd)
        self._fd = fd
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        log.debug("locked %s", self.path)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(fd)
        try:
            os.ftruncate(fd, 0)  # the next reader of a held lock must never see our name
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> StageLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def hold_stage(stage_dir: str | os.PathLike, rank: int):
    """The whole run's lock on ``stage_dir``, taken ONCE by rank 0. Every rank waits for rank 0's answer
    (a broadcast) before it goes on, so no rank writes before the lock is held, and a refusal stops every
    rank (none is left waiting in a collective). On success, all ranks meet at a barrier before rank 0
    lets go, so nothing is written after the lock is released."""
    import torch.distributed as dist

    lock, problem = None, None
    if rank == 0:
        try:
            lock = StageLock(stage_dir).acquire()
        except StageLockedError as e:
            problem = str(e)
        except OSError as e:  # e.g. no permission: every rank must hear of it, not wait for rank 0
            problem = f"cannot lock {stage_dir}: {e}"
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise StageLockedError(problem)
    try:
        yield lock
        if distributed:
            dist.barrier()
    finally:
        if lock is not None:
            lock.release()
