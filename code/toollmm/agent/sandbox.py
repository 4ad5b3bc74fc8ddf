"""Where tools run: file arguments confined to a workspace, user code in a killable child process.

* ``Workspace.resolve(arg)`` turns a path written by the model into a real path inside the workspace, or
  raises ``PathRefused`` saying why (absolute, ``..``, NUL byte, too long, a symlink that leads out).
* ``run_isolated(fn, kwargs, ...)`` runs ``fn(**kwargs)`` in a fresh interpreter that starts its own
  session (so the whole process group is killed on timeout), with the workspace as its working
  directory. The child truncates its own output before sending it back, so a tool returning a gigabyte
  cannot flood the parent; its prints go to stderr, never into a ``--json`` stdout. Nothing here ever
  raises on tool behaviour: crash, hang, exception, odd result all come back as an error string.

Threat model: the MODEL's output is untrusted (arguments, paths, call counts); the tool CODE is the user's
own and trusted (it is isolated for robustness — hangs, crashes, leaks — not sandboxed against malice).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from toollmm.core.errors import UserError
from toollmm.core.paths import resolve

log = logging.getLogger(__name__)

MAX_PATH_CHARS = 1024


class PathRefused(UserError, ValueError):
    """A model-written path that may not be used."""


class Workspace:
    """A folder that every model-written file argument must stay inside."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        # relative roots (config values: inference.workspace) are taken from the repo root, not the cwd;
        # ``create=False``: the folder is made when a tool first runs (``ensure``), so a text-only session
        # leaves no empty folder behind
        self.root = Path(resolve(root)).resolve()
        if create:
            self.ensure()

    def ensure(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

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


_BOOT = "import sys; from toollmm.agent.sandbox import worker_main; worker_main(int(sys.argv[1]))"


def function_ref(fn) -> str:
    """``"module:qualname"`` of a module-level function that a fresh interpreter can import; TypeError
    for closures, lambdas, methods of local classes and functions defined in ``__main__``."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise TypeError(f"{fn!r} is not a module-level function")
    if module == "__main__":
        raise TypeError("defined in __main__, which a tool process cannot import")
    if resolve_function_ref(f"{module}:{qualname}") is not fn:
        raise TypeError(f"{module}:{qualname} does not name {fn!r}")
    return f"{module}:{qualname}"


def resolve_function_ref(ref: str):
    """The function a ``function_ref`` names (imports its module)."""
    module, _, qualname = ref.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def worker_main(reply_fd: int) -> None:
    """Entry of the tool process: read one JSON object ``{"fn": "module:qualname", "kwargs", "cwd",
    "max_chars"}`` from stdin (no pickle: nothing but JSON crosses the pipe), run the named function,
    write one JSON line ``{"status", "payload"}`` to ``reply_fd``. Tool prints go to stderr."""
    try:
        call = json.loads(sys.stdin.buffer.read())
        fn, kwargs, cwd, max_chars = (
            resolve_function_ref(call["fn"]),
            call["kwargs"],
            call["cwd"],
            call["max_chars"],
        )
    except BaseException as e:  # noqa: BLE001 - e.g. the tool's module cannot be imported here
        reply = {
            "status": "error",
            "payload": f"could not load the tool in its process: {type(e).__name__}: {e}",
        }
    else:
        try:
            if cwd:
                os.chdir(cwd)
            reply = {"status": "ok", "payload": truncate(to_text(fn(**kwargs)), max_chars)}
        except BaseException as e:  # noqa: BLE001 - everything becomes an error message for the parent
            reply = {"status": "error", "payload": truncate(f"{type(e).__name__}: {e}", max_chars)}
    os.write(reply_fd, (json.dumps(reply) + "\n").encode())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)  # do not wait for threads the tool may have left behind


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the tool's own session: children die too
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.kill()
    except (ProcessLookupError, OSError):
        pass
    proc.wait()


def _stderr_fd():
    """Where a tool's prints go: the real stderr (never stdout, which may carry --json output)."""
    try:
        return sys.__stderr__.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def _read_reply(fd: int, deadline: float) -> bytes | None:
    """Bytes up to the first newline, b"" on EOF without one, None on timeout."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return buf
        buf += chunk
    return buf


def run_isolated(
    fn, kwargs: dict, *, timeout_s: float, cwd: str | os.PathLike | None = None, max_chars: int = 4000
) -> tuple[str | None, str | None]:
    """``(result, None)`` or ``(None, error)``. ``fn`` runs in a fresh interpreter in its own session
    (``python -c``, not multiprocessing: the caller's ``__main__`` is never re-run), with the caller's
    ``sys.path``; after ``timeout_s`` the whole process group is killed."""
    try:
        call = {"fn": function_ref(fn), "kwargs": kwargs, "cwd": os.fspath(cwd) if cwd else None}
        payload = json.dumps({**call, "max_chars": max_chars}).encode()
    except Exception as e:
        return None, f"could not send the call to a tool process: {type(e).__name__}: {e}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=_stderr_fd(),
            pass_fds=(write_fd,),
            start_new_session=True,
            env=env,
        )
    except OSError as e:
        os.close(read_fd)
        return None, f"could not start the tool process: {e}"
    finally:
        os.close(write_fd)
    deadline = time.monotonic() + timeout_s
    try:
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        raw = _read_reply(read_fd, deadline)
        if raw is None:
            return None, f"timed out after {timeout_s:g} s (tool process killed)"
        if not raw:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            return None, f"tool process crashed ({how}) without a result"
        try:
            reply = json.loads(raw.split(b"\n", 1)[0])
            status, text = reply["status"], str(reply["payload"])
        except (ValueError, KeyError, TypeError) as e:
            return None, f"tool result could not be read: {type(e).__name__}: {e}"
        return (text, None) if status == "ok" else (None, text)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:g} s (tool process killed)"
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            log.warning("tool process %s still running: killing its group", proc.pid)
        _kill_group(proc)
