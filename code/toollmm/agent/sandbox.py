"""Where tools run: file arguments confined to a workspace, user code in a killable child process.

* ``Workspace.resolve(arg)`` turns a path written by the model into a real path inside the workspace, or
  raises ``PathRefused`` saying why (absolute, ``..``, NUL byte, too long, a symlink that leads out).
* ``run_isolated(fn, kwargs, ...)`` runs ``fn(**kwargs)`` in a fresh ``spawn``-ed process that starts its
  own session (so the whole process group is killed on timeout), with the workspace as its working
  directory. The child truncates its own output before sending it back, so a tool returning a gigabyte
  cannot flood the parent. Nothing here ever raises on tool behaviour: crash, hang, exception, unpicklable
  result all come back as an error string.

Threat model: the MODEL's output is untrusted (arguments, paths, call counts); the tool CODE is the user's
own and trusted (it is isolated for robustness — hangs, crashes, leaks — not sandboxed against malice).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

log = logging.getLogger(__name__)

MAX_PATH_CHARS = 1024


class PathRefused(ValueError):
    """A model-written path that may not be used."""


class Workspace:
    """A folder that every model-written file argument must stay inside."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, arg: Any) -> Path:
        if not isinstance(arg, str):
            raise PathRefused(f"a path must be a string, got {type(arg).__name__}")
        if not arg.strip():
            raise PathRefused("empty path")
        if len(arg) > MAX_PATH_CHARS:
            raise PathRefused(f"path longer than {MAX_PATH_CHARS} characters")
        if "\x00" in arg:
            raise PathRefused("path contains a NUL byte")
        text = arg.strip()
        if text.startswith("~"):
            raise PathRefused(f"{text!r}: home-relative paths are not allowed")
        if (
            PurePosixPath(text).is_absolute()
            or PureWindowsPath(text).is_absolute()
            or PureWindowsPath(text).drive
        ):
            raise PathRefused(f"{text!r}: absolute paths are not allowed (use a path inside the workspace)")
        parts = text.replace("\\", "/").split("/")
        if ".." in parts:
            raise PathRefused(f"{text!r}: '..' is not allowed")
        real = (self.root / text).resolve()  # follows every symlink on the way
        if not real.is_relative_to(self.root):
            raise PathRefused(f"{text!r}: resolves outside the workspace (symlink?)")
        return real

    def relative(self, path: str | os.PathLike) -> str:
        """A tool-returned path as the model should see it (workspace-relative); raises if outside."""
        p = Path(path)
        real = (p if p.is_absolute() else self.root / p).resolve()
        if not real.is_relative_to(self.root):
            raise PathRefused(f"{str(path)!r} is outside the workspace")
        return real.relative_to(self.root).as_posix()


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, saying how much was dropped."""
    if limit <= 0 or len(text) <= limit:
        return text
    return text[:limit] + f"... [truncated: {len(text) - limit} more characters]"


def to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def _child(conn, fn, kwargs: dict, cwd: str | None, max_chars: int) -> None:
    """Runs in the spawned process: own session, workspace cwd, truncated reply."""
    try:
        os.setsid()
    except OSError:
        pass
    try:
        if cwd:
            os.chdir(cwd)
        value = fn(**kwargs)
        reply = ("ok", truncate(to_text(value), max_chars))
    except BaseException as e:  # noqa: BLE001 - everything becomes an error message for the parent
        reply = ("error", truncate(f"{type(e).__name__}: {e}", max_chars))
    try:
        conn.send(reply)
    finally:
        conn.close()


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.kill()
    except (ProcessLookupError, OSError, ValueError):
        pass


def run_isolated(
    fn, kwargs: dict, *, timeout_s: float, cwd: str | os.PathLike | None = None, max_chars: int = 4000
) -> tuple[str | None, str | None]:
    """``(result, None)`` or ``(None, error)``; the child is killed (whole group) after ``timeout_s``."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(send, fn, kwargs, os.fspath(cwd) if cwd else None, max_chars), daemon=True
    )
    try:
        proc.start()
    except Exception as e:  # unpicklable callable or arguments, fork limits...
        recv.close()
        send.close()
        return None, f"could not start the tool process: {type(e).__name__}: {e}"
    send.close()
    deadline = time.monotonic() + timeout_s
    try:
        if not recv.poll(max(0.0, timeout_s)):
            _kill_group(proc)
            return None, f"timed out after {timeout_s:g} s (tool process killed)"
        try:
            status, payload = recv.recv()
        except (EOFError, OSError):
            proc.join(max(0.1, deadline - time.monotonic()))
            code = proc.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            return None, f"tool process crashed ({how}) without a result"
        except Exception as e:  # the result could not be unpickled
            return None, f"tool result could not be read: {type(e).__name__}: {e}"
        return (payload, None) if status == "ok" else (None, payload)
    finally:
        recv.close()
        proc.join(0.5)
        if proc.is_alive():
            _kill_group(proc)
            proc.join(1.0)
        try:
            proc.close()
        except ValueError:
            log.warning("tool process %s did not exit", proc.pid)
