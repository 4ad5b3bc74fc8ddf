"""The floor plan of ``toollmm``, checked on the import graph drawn from the source.

The graph is built with ``ast`` from every ``code/toollmm/**/*.py``: module-level AND function-local imports
(a local import still makes the importer depend on the imported module; it only delays the cost), and
``if TYPE_CHECKING:`` imports too. An edge goes to the most specific module that exists
(``from .pkg import sub`` -> ``pkg.sub``; ``from .mod import name`` -> ``mod``); a package's ``__init__``
is not counted as imported by its submodules. Three rules:

* no circle among ``toollmm`` modules;
* a lower floor never imports a higher one (``FLOORS``, lowest first; modules on one floor may import
  each other), and ``release`` does not import ``eval`` (metrics are passed in);
* nothing outside ``toollmm/demo/`` imports ``toollmm.demo``.

Each rule allows no violation. ``test_the_checks_catch_*`` run the same functions on a tiny synthetic package, so each rule can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from toollmm.core.paths import REPO_ROOT

PACKAGE = "toollmm"
CODE = REPO_ROOT / "code"

#: floors, lowest first: (floor, name, module prefixes). A module takes the floor of its longest matching
#: prefix; a module matched by none is on floor 0; the package itself (``toollmm.load``) is on the ``infer`` floor.
FLOORS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "core", ("toollmm.core",)),
    (1, "data", ("toollmm.data",)),
    (2, "model", ("toollmm.model",)),
    (3, "checkpoint", ("toollmm.checkpoint",)),
    (4, "train", ("toollmm.train",)),
    (4, "agent", ("toollmm.agent",)),
    (5, "infer", ("toollmm.infer",)),
    (6, "serve", ("toollmm.serve",)),
    (6, "release", ("toollmm.release",)),
    (6, "eval", ("toollmm.eval",)),
    (7, "demo", ("toollmm.demo",)),
    (7, "perf", ("toollmm.perf",)),
]
#: imports forbidden although the floors would allow them: (importer's floor name, imported floor name)
FORBIDDEN = {("release", "eval")}

# ------------------------------------------------------------------------------------------------------ graph
def modules(code_dir: Path, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """``dotted name -> (file, is_package)`` for every module of ``package`` under ``code_dir``."""
    out = {}
    for f in sorted((code_dir / package).rglob("*.py")):
        parts = list(f.relative_to(code_dir).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def import_graph(code_dir: Path, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """``importer -> {imported: first line}`` over ``package``'s modules, every import statement counted
    (module level, inside functions, under ``TYPE_CHECKING``)."""
    mods = modules(code_dir, package)

    def known(name: str) -> str | None:  # the most specific existing module named by ``name``
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, (path, is_pkg) in mods.items():
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [
                    f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin for a in node.names
                ]
            else:
                continue
            for t in targets:
                if t == package or t.startswith(package + "."):
                    target = known(t)
                    if target and target != mod:
                        graph[mod].setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(comp)
    return found


def floor_of(module: str, package: str = PACKAGE) -> tuple[int, str]:
    """``(floor, floor name)`` of ``module`` (see ``FLOORS``)."""
    if module == package:  # ``toollmm.load`` is ``infer.runtime.load``
        return floor_of(f"{package}.infer", package)
    best: tuple[int, int, str] | None = None
    for floor, name, prefixes in FLOORS:
        for p in prefixes:
            p = package + p[len(PACKAGE) :]
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), floor, name)
    return (best[1], best[2]) if best else (0, "core")


def floor_violations(graph: dict[str, dict[str, int]], package: str = PACKAGE) -> set[tuple[str, str]]:
    """Edges from a lower floor to a higher one, and the ``FORBIDDEN`` ones."""
    out = set()
    for a, targets in graph.items():
        fa, na = floor_of(a, package)
        for b in targets:
            fb, nb = floor_of(b, package)
            if fb > fa or (na, nb) in FORBIDDEN:
                out.add((a, b))
    return out


def demo_imports(
    graph: dict[str, dict[str, int]], package: str = PACKAGE, also: tuple[str, ...] = ()
) -> set[tuple[str, str]]:
    """Edges into ``<package>.demo`` (and the modules named in ``also``) from modules outside them."""
    demo = (f"{package}.demo", *also)

    def inside(m: str) -> bool:
        return any(m == d or m.startswith(d + ".") for d in demo)

    return {(a, b) for a, targets in graph.items() if not inside(a) for b in targets if inside(b)}


def _describe(graph: dict[str, dict[str, int]], edges) -> str:
    return "\n".join(
        f"  {a} -> {b} (line {graph[a][b]}; floors {floor_of(a)[1]} -> {floor_of(b)[1]})"
        for a, b in sorted(edges)
    )


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(CODE)


# ------------------------------------------------------------------------------------------------------ toollmm
def test_the_graph_sees_the_package(graph):
    """Sanity: the graph has the package's modules and its function-local edges."""
    assert len(graph) > 100
    assert "toollmm.infer.runtime" in graph["toollmm"]  # toollmm.load imports it inside the function
    assert "toollmm.infer.step" in graph["toollmm.infer.runtime"]  # a function-local import


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(
        "  "
        + " <-> ".join(sorted(c))
        + "\n"
        + _describe(graph, {(a, b) for a in c for b in graph[a] if b in c})
        for c in found
    )


def test_no_floor_violations(graph):
    found = floor_violations(graph)
    assert not found, "a lower floor imports a higher one:\n" + _describe(graph, found)


def test_nothing_outside_demo_imports_it(graph):
    found = demo_imports(graph)
    assert not found, "the demo imported from outside it:\n" + _describe(graph, found)


# ------------------------------------------------------------------------------------------------------ self-check
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "toollmm" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    for d in [root / "toollmm", *(root / "toollmm").rglob("*")]:  # every folder a package
        if d.is_dir() and not (d / "__init__.py").exists():
            (d / "__init__.py").write_text("", encoding="utf-8")
    return root


CLEAN = {
    "core/paths.py": "import os\n",
    "data/records.py": "from ..core.paths import os\n",
    "model/net.py": "from toollmm.data import records\n",
    "infer/runtime.py": "def load():\n    from ..model.net import records\n    from . import step\n",
    "infer/step.py": "from ..model import net\n",
    "demo/tools.py": "from ..infer.runtime import load\n",
    "perf/fig.py": "import toollmm.infer.runtime as r\n",
}


def test_the_checks_pass_a_clean_synthetic_package(tmp_path):
    g = import_graph(_write(tmp_path, CLEAN))
    assert g["toollmm.infer.runtime"] == {"toollmm.model.net": 2, "toollmm.infer.step": 3}
    assert g["toollmm.data.records"] == {"toollmm.core.paths": 1}
    assert g["toollmm.perf.fig"] == {"toollmm.infer.runtime": 1}
    assert cycles(g) == [] and floor_violations(g) == set() and demo_imports(g) == set()


def test_the_checks_catch_a_circle_through_a_function_local_import(tmp_path):
    g = import_graph(
        _write(tmp_path, {**CLEAN, "infer/step.py": "def f():\n    from .runtime import load\n"})
    )
    assert cycles(g) == [{"toollmm.infer.runtime", "toollmm.infer.step"}]
    three = {"agent/a.py": "from . import b\n", "agent/b.py": "import toollmm.agent.c\n"}
    g = import_graph(_write(tmp_path, {**CLEAN, **three, "agent/c.py": "from .a import x\n"}))
    assert {"toollmm.agent.a", "toollmm.agent.b", "toollmm.agent.c"} in cycles(g)


def test_the_checks_catch_a_lower_floor_importing_a_higher_one(tmp_path):
    files = {
        **CLEAN,
        "model/net.py": "def step():\n    from ..infer.step import f\n",  # model (2) -> infer (5)
        "core/config.py": "from toollmm.data import records\n",  # core (0) -> data (1)
        "release/card.py": "from ..eval import metrics\n",  # release -> eval: same floor, forbidden
        "eval/metrics.py": "",
    }
    g = import_graph(_write(tmp_path, files))
    assert floor_violations(g) == {
        ("toollmm.model.net", "toollmm.infer.step"),
        ("toollmm.core.config", "toollmm.data.records"),
        ("toollmm.release.card", "toollmm.eval.metrics"),
    }


def test_the_checks_catch_an_import_of_the_demo_from_outside_it(tmp_path):
    files = {**CLEAN, "agent/toolsets.py": "def demo():\n    from ..demo import tools\n"}
    g = import_graph(_write(tmp_path, files))
    assert demo_imports(g) == {("toollmm.agent.toolsets", "toollmm.demo.tools")}
    assert ("toollmm.agent.toolsets", "toollmm.demo.tools") in floor_violations(g)
