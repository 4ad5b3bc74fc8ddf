"""The one place that knows where the repository is, and how a relative path is read.

* Paths inside our config files (``config/*.yaml``, ``--config`` layers, the config saved with a stage
  folder) and in ``key=value`` overrides are config values: relative ones resolve against ``REPO_ROOT``
  (:func:`resolve`), never the working directory, so a config means the same from any folder.
  ``TOOLLMM_HOME`` overrides the root for installs outside a checkout.
* Paths a user types as a command-line flag (``--image``, ``--output-dir``, ``--config``, ...) resolve
  against the current directory, as every CLI does: entry points parse them with :func:`cli_path` (or
  :func:`cli_checkpoint` where a Hub id is also accepted) into absolute paths. Flag defaults that name
  the repo's own folders (``data/demo``, ``outputs/demo``) are given as repo paths (:func:`repo_default`).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(os.environ.get("TOOLLMM_HOME", Path(__file__).resolve().parents[3])).resolve()
CONFIG_DIR = REPO_ROOT / "config"
DSCONFIG_DIR = REPO_ROOT / "dsconfig"
DATA_DIR = REPO_ROOT / "data"
OUTPUTS_DIR = REPO_ROOT / "outputs"
CACHE_DIR = REPO_ROOT / ".cache"
PRETRAINED_DIR = REPO_ROOT / "pretrained_checkpoint"


def resolve(path: str | os.PathLike | None) -> Path | None:
    """Absolute paths and ``~`` stay as they are; relative ones are taken from the repo root."""
    if path is None or str(path) == "":
        return None
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (REPO_ROOT / p)


def cli_path(text: str) -> str:
    """A path typed on the command line, absolute against the current directory (``~`` expanded)."""
    return os.path.abspath(os.path.expanduser(str(text)))


def cli_checkpoint(text: str) -> str:
    """``--checkpoint``: a local folder (absolute against the current directory) or a Hub id ``owner/name``
    (kept as it is when no such local folder exists)."""
    raw = str(text)
    local = cli_path(raw)
    hub_like = raw.count("/") == 1 and not raw.startswith((".", "/", "~")) and not raw.endswith("/")
    return raw if hub_like and not os.path.exists(local) else local


def cli_config_file(text: str) -> str:
    """``--config FILE``: absolute against the current directory; a file missing there but present in the
    repo is named in the error (a config layer is a file you point at, like any CLI argument)."""
    import argparse

    path = cli_path(text)
    if (
        not os.path.isfile(path)
        and not os.path.isabs(os.path.expanduser(text))
        and (REPO_ROOT / text).is_file()
    ):
        raise argparse.ArgumentTypeError(
            f"{path}: not found (files on the command line are taken from the current directory;"
            f" the repo's file is {REPO_ROOT / text})"
        )
    return path


def repo_default(rel: str) -> str:
    """A flag default naming a folder of this repo (absolute, so it is not re-read against the cwd)."""
    return str(REPO_ROOT / rel)


def ensure_torch_extensions_dir() -> Path:
    """DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR; keep it in a persistent, git-ignored folder
    so a fresh temp dir (every test) does not pay the ~25 s build again."""
    d = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE_DIR / "torch_extensions")))
    d.mkdir(parents=True, exist_ok=True)
    return d


def clear_build_locks(since: float) -> list[Path]:
    """Remove the ``lock`` files that torch's JIT build leaves in ``TORCH_EXTENSIONS_DIR/<op>/`` when the
    building process is killed (every later load of that op then waits on the lock forever), keeping only
    locks older than ``since`` (a ``time.time()``): call it after killing a process group that started at
    ``since``, so a build another live process began earlier is left alone. Returns the removed paths."""
    d = ensure_torch_extensions_dir()
    removed = []
    for lock in d.glob("*/lock"):
        try:
            if lock.stat().st_mtime >= since:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # the build finished meanwhile
            pass
    return removed


def build_cpu_comm_op() -> float | None:
    """Build (or load, when built before) DeepSpeed's shared-memory all-reduce op into
    ``TORCH_EXTENSIONS_DIR`` on a CPU host, where every gloo run loads it; ``None`` where the accelerator is
    not the CPU (nothing to build). Returns the seconds it took (~20 s to build here, ~0 once built)."""
    import time

    from deepspeed.accelerator import get_accelerator

    ensure_torch_extensions_dir()
    if get_accelerator().device_name() != "cpu":
        return None
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    t = time.time()
    ShareMemCommBuilder().load(verbose=False)
    return time.time() - t
