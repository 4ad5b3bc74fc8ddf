"""dsconfig/*.json hold systems settings only; the YAML's numbers are injected; DeepSpeed's own parser
reads bf16 on / fp16 off from the GPU configs; CPU runs are fp32; train.sh builds the right launcher line."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from toollmm.core.config import load_config
from toollmm.core.paths import DSCONFIG_DIR, REPO_ROOT
from toollmm.train.ds import YAML_OWNED, DeepSpeedConfigError, build_ds_config, compute_dtype, load_ds_json

DS_FILES = sorted(DSCONFIG_DIR.glob("*.json"))


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_json_holds_systems_settings_only_and_deepspeed_reads_bf16(path):
    ds = load_ds_json(path)
    assert not set(ds) & set(YAML_OWNED)
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=2)
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own parser
    assert parsed.bfloat16_config.enabled is True
    assert parsed.float16_config.enabled is False


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_yaml_numbers_are_injected_for_any_world_size(stage):
    cfg = load_config(
        stage=stage, overrides=["train.micro_batch_size=3", "train.grad_accum=5", "train.optim.grad_clip=0.5"]
    ).config
    for world in (1, 8):
        ds = build_ds_config(cfg, world_size=world, on_gpu=False)
        assert ds["train_batch_size"] == 3 * 5 * world
        assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
        assert ds["gradient_clipping"] == 0.5
        assert ds["optimizer"]["params"]["lr"] == cfg.train.optim.lr
        assert ds["optimizer"]["params"]["torch_adam"] is True
        # CPU: every precision block off -> fp32
        assert compute_dtype(ds) == torch.float32
        if world == 1:  # DeepSpeed's parser checks the batch identity against the (single-process) world
            assert DeepSpeedConfig(ds).bfloat16_config.enabled is False


def test_misspelt_or_yaml_owned_keys_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"bf16": {"enable": true}, "train_batch_size": 32}')
    with pytest.raises(DeepSpeedConfigError) as e:
        load_ds_json(bad)
    assert "bf16.'enable' is not a DeepSpeed key" in str(e.value)
    assert "'train_batch_size' belongs in config/stage_N.yaml" in str(e.value)


def test_gpu_bf16_is_kept_when_requested():
    cfg = load_config(stage=3).config
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert compute_dtype(build_ds_config(cfg, 1, on_gpu=True)) == torch.bfloat16
    else:
        with pytest.raises(DeepSpeedConfigError, match="no bf16 support"):
            build_ds_config(cfg, 1, on_gpu=True)


def _train_sh(*args, env=None):
    e = {**os.environ, **(env or {})}
    for k in ("MASTER_PORT", "MASTER_ADDR", "OMP_NUM_THREADS"):  # set by in-process runs / the caller
        e.pop(k, None)
    return subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/train.sh"), *args], capture_output=True, text=True, env=e
    )


def test_train_sh_dry_run_cpu_single_and_multi_rank():
    out = _train_sh("--stage", "1", "--dry-run", "run.name=x")
    assert out.returncode == 0, out.stderr
    assert (
        "python" in out.stdout
        and "code/train.py --stage 1 run.name=x" in out.stdout
        and "deepspeed" not in out.stdout
    )
    out = _train_sh("--stage", "3", "--num_gpus", "2", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.startswith("OMP_NUM_THREADS=")
        and "bin/deepspeed --master_port 29500 --num_gpus 2" in out.stdout
    )
    assert out.stdout.split("OMP_NUM_THREADS=")[1].split()[0] == str(max(1, (os.cpu_count() or 1) // 2))


def test_train_sh_dry_run_hostfile_and_gpus(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    out = _train_sh("--stage", "2", "--hostfile", str(hosts), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert f"--hostfile {hosts}" in out.stdout and "code/train.py --stage 2" in out.stdout
    # a host whose driver lists 4 GPUs and whose torch sees them: all local GPUs by default, or --num_gpus
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA A100-SXM4-80GB (UUID: GPU-$i)"; done\n'
    )
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "TOOLLMM_DRYRUN_TORCH_GPUS": "4"}
    out = _train_sh("--stage", "1", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    assert "bin/deepspeed --master_port 29500 " in out.stdout and "--num_gpus" not in out.stdout
    out = _train_sh("--stage", "1", "--num_gpus", "2", "--dry-run", env=env)
    assert "--num_gpus 2" in out.stdout and "OMP_NUM_THREADS" not in out.stdout
    # ... and one whose torch build cannot use them: a clear stop, never a CPU fallback
    env["TOOLLMM_DRYRUN_TORCH_GPUS"] = "0"
    out = _train_sh("--stage", "1", "--dry-run", env=env)
    assert (
        out.returncode != 0
        and "sees 4 GPU(s) but torch cannot use them" in out.stderr
        and "cu128" in out.stderr
    )


def test_train_sh_rejects_bad_arguments():
    assert "--stage N is required" in _train_sh("--dry-run").stderr
    assert "--stage must be 0-3" in _train_sh("--stage", "7", "--dry-run").stderr
    assert "not found" in _train_sh("--stage", "1", "--hostfile", "/nonexistent", "--dry-run").stderr
