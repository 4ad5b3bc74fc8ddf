"""The demo's paths follow the run (issue 21, items 6 and 12).

``${dotted.key}`` references in config values (configlib): ``config/demo.yaml`` builds its caches, base
models, ``init_from`` and corpus paths from ``run.output_root``, ``run.name`` and ``vars.demo_data``, so a
user's own run (``run.name=mine``) no longer writes into the demo's caches; ``scripts/demo.sh --out DIR``
puts the corpus, base models, caches, stage folders and metrics under DIR (checked with ``--dry-run`` and
the resolved configs of every stage), so the slow test never replaces a user's ``outputs/demo/``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field

import pytest

from toollmm.core import configlib
from toollmm.core.config import ConfigError, load_config
from toollmm.core.configlib import opt
from toollmm.core.paths import REPO_ROOT, resolve

DEMO = "config/demo.yaml"


@dataclass
class Inner:
    path: str = opt("${top.root}/inner", "")
    items: list[str] = opt(factory=list, help="")


@dataclass
class Top:
    root: str = opt("outputs", "")
    name: str = opt("run", "")
    cache: str = opt("${top.root}/${top.name}/cache", "")
    inner: Inner = opt(factory=Inner, help="")


@dataclass
class Tree:
    top: Top = opt(factory=Top, help="")
    vars: dict[str, str] = field(default_factory=dict)


def test_references_use_final_values_defaults_included():
    t = configlib.build(Tree, {"top": {"name": "mine", "inner": {"items": ["${top.cache}/a", "x"]}}})
    assert t.top.cache == "outputs/mine/cache" and t.top.inner.path == "outputs/inner"
    assert t.top.inner.items == ["outputs/mine/cache/a", "x"]  # nested references, in lists
    t = configlib.build(
        Tree, {"vars": {"d": "${top.root}/data"}, "top": {"root": "/r", "cache": "${vars.d}/c"}}
    )
    assert t.top.cache == "/r/data/c"


def test_bad_references_are_named():
    with pytest.raises(ConfigError) as e:
        configlib.build(
            Tree, {"top": {"cache": "${top.nope}/x", "name": "${top.name}"}}, {"top.cache": "my.yaml"}
        )
    text = str(e.value)
    assert "top.cache: ${top.nope} names no config value (from my.yaml)" in text
    assert "top.name: ${top.name} refers to itself" in text


def test_demo_paths_are_unchanged_by_default():
    for stage in range(4):
        c = load_config(stage=stage, config_files=[DEMO]).config
        assert c.model.feature_cache.dir == "outputs/demo/cache/features"
        assert c.data.captions == "outputs/demo/cache/captions"
        assert c.model.encoder.checkpoint == "outputs/demo/base/imagebind/imagebind_tiny.pth"
        assert all(s.path.startswith("data/demo/") and s.media_root == "data/demo" for s in c.data.train)
    assert load_config(stage=3, config_files=[DEMO]).config.train.init_from == "outputs/demo/stage_2"


def _paths(cfg) -> list[str]:
    m = cfg.model
    out = [m.feature_cache.dir, cfg.data.captions, m.encoder.checkpoint, m.llm.path, cfg.train.init_from]
    out += [cfg.train.export_llm, *(d.path for d in m.decoders.values())]
    out += [p for s in [*cfg.data.train, *cfg.data.heldout] for p in (s.path, s.media_root)]
    return [p for p in out if p]


def test_a_users_run_moves_the_caches(tmp_path):
    """``run.name=mine`` on top of the demo: caches, base models and init_from follow the run."""
    c = load_config(stage=3, config_files=[DEMO], overrides=["run.name=mine"]).config
    assert c.model.feature_cache.dir == "outputs/mine/cache/features"
    assert c.data.captions == "outputs/mine/cache/captions"
    assert c.train.init_from == "outputs/mine/stage_2" and c.model.llm.path == "outputs/mine/base/llm"
    where = [f"run.output_root={tmp_path}", "run.name=x", f"vars.demo_data={tmp_path}/x/data"]
    for stage in range(4):
        paths = _paths(load_config(stage=stage, config_files=[DEMO], overrides=where).config)
        assert len(paths) >= 5 and all(p.startswith(f"{tmp_path}/x/") for p in paths), paths


def test_demo_sh_out_puts_every_step_under_the_folder(tmp_path):
    out = tmp_path / "d"
    run = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--dry-run", "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    steps = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
    assert list(steps) == ["corpus", "base_models", "stage_0", "stage_1", "eval_stage_1", "stage_2",
                           "eval_stage_2", "stage_3", "eval_stage_3", "inference", "chat", "report"]  # fmt: skip
    assert "outputs/demo" not in run.stdout and " data/demo" not in run.stdout
    assert f"--output {out}/data" in steps["corpus"] and f"--output {out}/base" in steps["base_models"]
    assert f"--checkpoint {out}/stage_3" in steps["eval_stage_3"] and f"--run {out}" in steps["report"]
    assert (
        f"--checkpoint {out}/stage_3 --chat" in steps["chat"] and f"--output-dir {out}/chat" in steps["chat"]
    )
    assert not (out).exists()  # a dry run writes nothing
    # each stage's train.py config (the overrides demo.sh passes) has every path under --out
    for stage in range(4):
        argv = shlex.split(steps[f"stage_{stage}"])
        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        cfg = load_config(stage=stage, config_files=[DEMO], overrides=overrides).config
        assert str(resolve(cfg.run.output_root) / cfg.run.name) == str(out)
        assert all(p.startswith(f"{out}/") for p in _paths(cfg)), _paths(cfg)


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_demo_sh_runs_each_stage_on_both_cores_with_the_global_batch_of_one_process(tmp_path, ranks):
    """DEMO_RANKS=2 (the default on a CPU host with >= 2 cores): every stage is 2 gloo ranks through
    train.sh --num_gpus 2, micro batch 8 per rank, so the optimiser sees the one-process batch (16)."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"} | {"DEMO_RANKS": ranks}
    run = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--dry-run", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    steps = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
    for stage in range(4):
        argv = shlex.split(steps[f"stage_{stage}"])
        assert argv[:2] == ["bash", "scripts/train.sh"]
        nproc = int(argv[argv.index("--num_gpus") + 1]) if "--num_gpus" in argv else 1
        assert nproc == int(ranks)
        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        cfg = load_config(stage=stage, config_files=[DEMO], overrides=overrides).config
        assert cfg.train.micro_batch_size * cfg.train.grad_accum * nproc == 16, stage
    bad = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--dry-run", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60, env=env | {"DEMO_RANKS": "3"},
    )  # fmt: skip
    assert bad.returncode == 2 and "DEMO_RANKS" in bad.stderr


def test_slow_demo_test_writes_only_into_a_temporary_folder():
    text = (REPO_ROOT / "tests" / "demo" / "test_demo_e2e.py").read_text(encoding="utf-8")
    assert '"--out"' in text and 'REPO_ROOT / "outputs"' not in text
