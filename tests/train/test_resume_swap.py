"""A save killed at any point never wedges a resume (issue 16, item 5).

Re-saving under an existing tag swaps folders in steps (mark the partial complete, move the old folder
aside, rename the partial in, replace ``latest``, delete the old one). The save is stopped after each
step, as a kill would stop it; then both ``--resume`` and a fresh start must work, the resume must get
one whole checkpoint (the old or the new, bit for bit), and the next save must clean up.
"""

from __future__ import annotations

import logging
import shutil

import deepspeed
import pytest
import torch

from toollmm.core.config import load_config
from toollmm.train.ds import build_ds_config, init_distributed
from toollmm.train.loop import _resume_decision
from toollmm.train.resume import ResumeCheckpoints
from toollmm.train.schedule import make_scheduler

STEPS = ("complete", "aside", "in", "latest")


class Killed(BaseException):
    pass


def _engine(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))
    cfg = load_config(stage=1, overrides=["train.micro_batch_size=4"]).config
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=list(model.parameters()),
        config=build_ds_config(cfg, world_size=1, on_gpu=False),
        lr_scheduler=lambda opt: make_scheduler(opt, 20, cfg.train.optim),
    )
    return engine


def _train(engine, steps: int) -> None:
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        engine.backward(engine(torch.randn(4, 8, generator=g)).square().mean())
        engine.step()


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    init_distributed()
    base = tmp_path_factory.mktemp("swap") / "base"
    old = _engine(0)
    ck = ResumeCheckpoints(base, 0, 0, keep_last=3)
    _train(old, 2)
    ck.save(old, 2, {"data": {"consumed": 8}})
    _train(old, 1)
    ck.save(old, 3, {"data": {"consumed": 12}})
    new = _engine(5)  # a different run that saves under the same tag step_00000003
    _train(new, 3)
    return {"base": base, "old": _params(old), "new": new, "new_params": _params(new), "probe": _engine(9)}


@pytest.mark.parametrize("killed_after", STEPS)
def test_a_resave_killed_after_any_step_resumes(world, tmp_path, caplog, killed_after):
    d = tmp_path / "ckpt"
    shutil.copytree(world["base"], d)
    ck = ResumeCheckpoints(d, 0, 0, keep_last=3)

    def kill(step):
        if step == killed_after:
            raise Killed(step)

    ck.after_commit_step = kill
    with pytest.raises(Killed):
        ck.save(world["new"], 3, {"data": {"consumed": 99}})

    after = ResumeCheckpoints(d, 0, 0, keep_last=3)
    with caplog.at_level(logging.WARNING):
        assert _resume_decision(after, True) is True  # --resume finds a checkpoint
        assert _resume_decision(after, False) is False  # a fresh start is not refused either
        state = after.load(world["probe"])
    got = _params(world["probe"])
    assert state["step"] == 3
    if killed_after == "complete":  # `latest` still names the old, intact step_00000003
        assert _same(got, world["old"]) and state["data"] == {"consumed": 12}
    else:  # the new checkpoint is complete: used, via the fallback when `latest` names a gap
        assert _same(got, world["new_params"]) and state["data"] == {"consumed": 99}
    if killed_after == "aside":
        assert "using the newest complete checkpoint step_00000003.partial" in caplog.text

    after.save(world["probe"], 4, {})  # the next save cleans up every leftover
    names = sorted(p.name for p in d.iterdir() if not p.name.endswith(".py"))  # DeepSpeed's scripts
    assert names == ["latest", "step_00000002", "step_00000003", "step_00000004"]
    assert (d / "latest").read_text() == "step_00000004"


def test_latest_naming_a_missing_folder_falls_back(world, tmp_path, caplog):
    """What a kill between the delete and the rename left before the fix: `latest` names a folder that
    is gone, an incomplete partial and an older checkpoint remain."""
    d = tmp_path / "ckpt"
    shutil.copytree(world["base"], d)
    shutil.rmtree(d / "step_00000003")
    (d / "step_00000003.partial").mkdir()  # no complete.json: not usable
    ck = ResumeCheckpoints(d, 0, 0)
    with caplog.at_level(logging.WARNING):
        assert ck.latest() == "step_00000002"
    assert "names 'step_00000003', which is missing or incomplete" in caplog.text
    assert ck.load(world["probe"])["step"] == 2
    (d / "latest").write_text("../../etc")  # `latest` is data from the folder: never a path
    assert ck.latest() == "step_00000002"
    for p in list(d.iterdir()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert ck.latest() is None
