"""The install contract: exact pins, a complete constraints file, an idempotent setup, and CI wiring."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from toollmm.core.paths import REPO_ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")


def _pins(path):
    out = {}
    for line in (REPO_ROOT / path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{path}: not an exact pin: {line!r}"
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_every_direct_dependency_is_pinned_exactly_and_installed():
    req = _pins("requirements.txt")
    for name in [
        "torch",
        "deepspeed",
        "transformers",
        "peft",
        "diffusers",
        "imagebind-unofficial",
        "webdataset",
        "gradio",
        "av",
        "matplotlib",
    ]:
        assert name in req, name
    for name, version in req.items():
        assert metadata.version(name) == version, (
            f"{name}: installed {metadata.version(name)} != pinned {version}"
        )


def test_constraints_cover_every_installed_distribution():
    pinned = {**_pins("constraints.txt"), **_pins("requirements.txt")}
    missing = []
    for dist in metadata.distributions():
        if "_vendor" in str(getattr(dist, "_path", "")):
            continue  # setuptools' vendored copies (pkg_resources puts them on sys.path), not installs
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in {"toollmm", "pip"}:
            continue
        if pinned.get(name) != dist.version:
            missing.append(f"{name}=={dist.version} (pinned: {pinned.get(name)})")
    assert missing == [], (
        "installed but not pinned as installed (run scripts/setup.sh --refreeze): " + ", ".join(missing)
    )


def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve(),
    reason="runs only from this checkout's own .venv (elsewhere setup.sh would build a new one)",
)
def test_setup_is_idempotent_and_fast_when_up_to_date():
    t = time.monotonic()
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts/setup.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout
    assert time.monotonic() - t < 30


def test_setup_rejects_bad_arguments_clearly():
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/setup.sh"), "--torch", "cu999"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "--torch must be cu130 or cu128" in out.stderr
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/setup.sh"), "--bogus"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "unknown argument '--bogus'" in out.stderr


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci/run").read_text()
    assert "bash scripts/test.sh --all" in ci
    assert "bash scripts/test.sh" in (REPO_ROOT / "README.md").read_text()


def test_generated_and_weight_folders_are_git_ignored():
    out = subprocess.run(
        [
            "git",
            "check-ignore",
            "outputs/x",
            ".venv/x",
            ".cache/x",
            "pretrained_checkpoint/llm_ckpt/vicuna_7b/model.safetensors",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert len(out.stdout.split()) == 4, out.stdout
    out = subprocess.run(
        ["git", "check-ignore", "pretrained_checkpoint/README.md"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == ""
