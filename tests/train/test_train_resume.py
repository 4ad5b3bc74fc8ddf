"""Kill a stage with SIGKILL mid-run (the whole process group: trainer and DataLoader workers), resume it,
and get bit-identical trained weights to an uninterrupted run with the same seed (dropout on, two
DataLoader workers, shuffling, gradient accumulation, validation between checkpoints)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from _train_world import TRAIN_PY, child_env, read_jsonl, run_train

pytestmark = pytest.mark.slow

STEPS = 12
OVERRIDES = (
    f"train.max_steps={STEPS}",
    "train.save_every=2",
    "train.eval_every=3",
    "train.keep_last=2",
    "data.num_workers=2",
    "data.shuffle=true",
    "model.llm.lora.dropout=0.1",
    *(f"model.output_proj.{m}.dropout=0.1" for m in ("image", "video", "audio")),
)


def _weights(stage_dir) -> dict[str, torch.Tensor]:
    out = {f"delta.{k}": v for k, v in load_file(stage_dir / "delta.safetensors").items()}
    adapter = load_file(stage_dir / "adapter" / "adapter_model.safetensors")
    return out | {f"adapter.{k}": v for k, v in adapter.items()}


def _kill_after_first_checkpoint(args, ckpt_dir, log_path, timeout=300):
    """Start the stage in its own session, wait for a complete resume checkpoint, SIGKILL the group."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(TRAIN_PY), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=True,
        )
        latest, t0 = ckpt_dir / "latest", time.monotonic()
        try:
            while not latest.exists():
                assert proc.poll() is None, (
                    f"the run ended before its first checkpoint: {log_path.read_text()}"
                )
                assert time.monotonic() - t0 < timeout, "no checkpoint in time"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def test_sigkill_then_resume_is_bit_identical(train_world, tmp_path):
    t0 = time.monotonic()
    full = run_train(train_world.args(3, "resume_full", *OVERRIDES, init_from=None), tmp_path / "full.log")
    assert full == 0, (tmp_path / "full.log").read_text()[-3000:]
    t_full = time.monotonic() - t0

    args = train_world.args(3, "resume_cut", *OVERRIDES, init_from=None)
    stage_dir = train_world.stage_dir("resume_cut", 3)
    code = _kill_after_first_checkpoint(args, stage_dir / "ckpt", tmp_path / "cut.log")
    assert code == -signal.SIGKILL
    assert not (stage_dir / "stage.json").exists()  # killed mid-stage: no loadable folder yet
    tag = (stage_dir / "ckpt" / "latest").read_text().strip()
    killed_at = int(tag.split("_")[1])
    assert 2 <= killed_at < STEPS

    resumed = run_train([*args, "--resume"], tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert resumed == 0, log[-3000:]
    assert f"resumed from {stage_dir / 'ckpt' / tag} (step {killed_at})" in log

    ref, got = _weights(train_world.stage_dir("resume_full", 3)), _weights(stage_dir)
    assert ref.keys() == got.keys() and any(k.startswith("adapter.") for k in ref)
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, different[:5]
    # the metrics file reads as one run: each step once, the same losses as the uninterrupted run
    rows = lambda d: {r["step"]: r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r}  # noqa: E731
    assert rows(stage_dir) == rows(train_world.stage_dir("resume_full", 3))
    assert sorted(rows(stage_dir)) == list(range(1, STEPS + 1))
    print(
        f"uninterrupted run {t_full:.1f} s; killed after step {killed_at}; total {time.monotonic() - t0:.1f} s"
    )
