"""An entry point or script (``code/<name>.py``, ``scripts/<name>.py``: not package modules) loaded as a
module in a test. Each call executes the file again (a fresh module object under ``alias``, registered in
``sys.modules`` because dataclasses look their module up there)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from toollmm.core.paths import REPO_ROOT


def load_script(rel_path: str, alias: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(alias, REPO_ROOT / rel_path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return mod
