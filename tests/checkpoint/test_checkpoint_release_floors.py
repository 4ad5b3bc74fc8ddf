"""The checkpoint and release packages keep to their floors (issue 17): ``toollmm.checkpoint`` (stage
folders, delta, base models) imports the model and the ground floor only, never training, inference,
release, evaluation or demo code; ``toollmm.release`` never imports evaluation code (the card's tables are
passed in by ``code/release.py``); no module imports a private name of another toollmm module. Imports are
read from the source, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

from toollmm.core.paths import REPO_ROOT

PKG = REPO_ROOT / "code" / "toollmm"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in ``path``, function-local ones included."""
    parts = list(path.relative_to(REPO_ROOT / "code").with_suffix("").parts)
    base = parts[:-1]  # the package a relative import starts from (for __init__ too)
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            out.append((mod, [a.name for a in node.names]))
    return out


def _targets(package: str) -> dict[str, set[str]]:
    """file -> the toollmm modules (``from X import sub`` counted as ``X.sub``) it imports."""
    found = {}
    for f in sorted((PKG / package).rglob("*.py")):
        mods = set()
        for mod, names in _imports(f):
            if mod.startswith("toollmm"):
                mods |= {f"{mod}.{n}" for n in names} or {mod}
        found[str(f.relative_to(PKG))] = mods
    return found


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{f} imports {m}"
        for f, mods in _targets(package).items()
        for m in sorted(mods)
        if any(m == p or m.startswith(p + ".") for p in forbidden)
    ]


def test_checkpoint_imports_no_higher_floor():
    higher = ("train", "infer", "inference_api", "serve", "agent", "release", "eval", "demo", "bench", "perf")
    assert _targets("checkpoint"), "no checkpoint package found"
    assert _offenders("checkpoint", tuple(f"toollmm.{h}" for h in higher)) == []


def test_release_imports_no_evaluation_code():
    assert _offenders("release", ("toollmm.eval", "toollmm.demo")) == []


def test_no_private_name_imported_across_modules():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        for mod, names in _imports(f):
            if mod.startswith("toollmm"):
                bad += [
                    f"{f.relative_to(PKG)}: {n} from {mod}"
                    for n in names
                    if n.startswith("_") and n != "__version__"
                ]
    assert bad == []
