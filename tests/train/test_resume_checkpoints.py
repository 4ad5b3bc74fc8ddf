"""Resume checkpoints: DeepSpeed state + per-rank RNG round trip exactly; saves are atomic and pruned."""

from __future__ import annotations

import deepspeed
import pytest
import torch

from toollmm.core.config import load_config
from toollmm.train.ds import build_ds_config, init_distributed
from toollmm.train.resume import ResumeCheckpoints
from toollmm.train.schedule import lr_factor, make_scheduler


def _engine(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
    cfg = load_config(stage=1, overrides=["train.micro_batch_size=4", "train.optim.warmup_steps=2"]).config
    ds = build_ds_config(cfg, world_size=1, on_gpu=False)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters()],
        config=ds,
        lr_scheduler=lambda opt: make_scheduler(opt, 20, cfg.train.optim),
    )
    return engine


def _steps(engine, n, start):
    losses = []
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
        loss = torch.nn.functional.mse_loss(engine(x), y)  # dropout uses the global RNG
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def dist():
    return init_distributed()


def test_resume_is_exact_and_saves_are_atomic(tmp_path, dist):
    full = _engine()
    ref = _steps(full, 6, 0)
    ref_params = [p.detach().clone() for p in full.module.parameters()]

    first = _engine()
    ck = ResumeCheckpoints(tmp_path / "ckpt", rank=0, local_rank=0, keep_last=2)
    _steps(first, 2, 0)
    ck.save(first, 2, {"data": {"consumed": 8}})
    _steps(first, 1, 2)
    ck.save(first, 3, {"data": {"consumed": 12}})
    assert ck.latest() == "step_00000003"
    # a save killed half way leaves a .partial folder: ignored by latest(), removed by the next save
    (tmp_path / "ckpt" / "step_00000004.partial").mkdir()
    assert ck.latest() == "step_00000003"

    resumed = _engine(seed=123)  # different init: everything must come from the checkpoint
    torch.manual_seed(999)  # RNG must be restored too (dropout)
    state = ck.load(resumed)
    assert state["step"] == 3 and state["data"] == {"consumed": 12}
    rest = _steps(resumed, 3, 3)
    assert rest == ref[3:]
    for a, b in zip(ref_params, resumed.module.parameters()):
        assert torch.equal(a, b)
    assert resumed.lr_scheduler.last_epoch == full.lr_scheduler.last_epoch

    ck.save(resumed, 6, {})
    tags = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    assert tags == ["step_00000003", "step_00000006"]  # keep_last=2, stale partial removed


def test_missing_checkpoint_is_a_clear_error(tmp_path, dist):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ResumeCheckpoints(tmp_path, 0, 0).load(_engine())


def test_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant", 0.0) == 1.0
