"""The one place that knows where the repository is.

Every relative path in a config resolves against ``REPO_ROOT`` (never the working directory), so
``python code/train.py`` behaves the same from any folder. ``TOOLLMM_HOME`` overrides the root for
installs outside a checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(os.environ.get("TOOLLMM_HOME", Path(__file__).resolve().parents[2])).resolve()
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


def ensure_torch_extensions_dir() -> Path:
    """DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR; keep it in a persistent, git-ignored folder
    so a fresh temp dir (every test) does not pay the ~25 s build again."""
    d = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE_DIR / "torch_extensions")))
    d.mkdir(parents=True, exist_ok=True)
    return d
