"""The real recipe in-process on the tiny world: every stage trains exactly its trainable set, stage folders
are cumulative, rank-0 logging writes its files, CPU runs are fp32, and the CLI's small promises hold."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig
from safetensors.torch import load_file

from _train_world import read_jsonl
from entry_points import load_script
from toollmm.checkpoint.stage import load_into, load_stage, stage_config
from toollmm.core.config import load_config
from toollmm.model.toollmm_model import build_model
from toollmm.train.build import seed_all
from toollmm.train.ds import build_ds_config, compute_dtype
from toollmm.train.tracking import Tracker

STAGE_3_NO_INPUT_PROJ = (
    "train.trainable=[lora, output_proj.image, output_proj.video, output_proj.audio, "
    "token_rows.signal, token_rows.tool]"
)


def _train_module():
    return load_script("code/train.py", "train_entry")


TRAIN = _train_module()


def run(args: list[str]) -> dict:
    """``code/train.py``'s own parsing and config loading, then the stage, keeping the trained model."""
    from toollmm.train.loop import run_stage

    parsed = TRAIN.parse_args(args)
    loaded = load_config(stage=parsed.stage, config_files=parsed.config, overrides=parsed.overrides)
    return {"loaded": loaded, **run_stage(loaded, resume=parsed.resume)}


def initial_model(loaded):
    """The model a stage starts from, built the way the recipe builds it (seed, base, init_from)."""
    cfg = loaded.config
    seed_all(cfg.run.seed)
    model = build_model(cfg.model, loss_weights=cfg.train.loss_weights)
    if cfg.train.init_from:
        load_into(model, cfg.train.init_from)
    model.trainable_parameters(cfg.train.trainable)
    return model


@pytest.fixture(scope="module")
def chain(train_world):
    """Stages 0..3 of one run (stage 1 starts from the random tiny Llama; 2 and 3 from the previous stage),
    plus a stage 3 that does not train the input projection; each with the model it started from."""
    out = {}
    for stage in (0, 1, 2, 3):
        out[stage] = run(train_world.args(stage, "chain"))  # 2 and 3: init_from: previous
        out[stage]["initial"] = initial_model(out[stage]["loaded"])
    args = train_world.args(
        3, "frozen_in", STAGE_3_NO_INPUT_PROJ, init_from=str(train_world.stage_dir("chain", 2))
    )
    out["frozen_in"] = run(args)
    out["frozen_in"]["initial"] = initial_model(out["frozen_in"]["loaded"])
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3, "frozen_in"])
def test_each_stage_trains_exactly_its_trainable_set(chain, stage):
    result = chain[stage]
    trained, initial = result["model"], result["initial"]
    names = result["loaded"].config.train.trainable
    groups = trained.named_parts()
    trainable = {n for name in names for n, _ in groups[name]}
    before = dict(initial.named_parameters())
    changed = set()
    for n, p in trained.named_parameters():
        assert p.requires_grad == (n in trainable), n
        assert torch.isfinite(p).all(), n
        if not torch.equal(p.detach(), before[n].detach()):
            changed.add(n)
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    lines = [r for r in read_jsonl(result["stage_dir"] + "/metrics.jsonl") if "loss" in r]
    assert len(lines) == result["steps"] == 2
    assert all(math.isfinite(v) for r in lines for k, v in r.items() if k == "loss" or k.startswith("align"))
    for name in names:  # every trainable name moved; an output projection only if it had targets
        m = name.split(".")[1] if name.startswith("output_proj.") else None
        if m is None or any(r.get(f"align_{m}", 0) > 0 for r in lines):  # absent: no targets
            assert changed & {n for n, _ in groups[name]}, f"{name} did not train"


def test_gradient_accumulation_counts_optimiser_steps(chain):
    cfg = chain[3]["loaded"].config
    assert cfg.train.grad_accum == 2  # config/stage_3.yaml
    end = read_jsonl(chain[3]["stage_dir"] + "/metrics.jsonl")[-1]
    assert end["event"] == "end" and end["data"]["consumed"] == 2 * 2  # steps x grad_accum micro-batches
    assert chain[3]["ranks"][0]["samples"] == 2 * 2 * cfg.train.micro_batch_size


def _delta(stage_dir):
    return load_file(f"{stage_dir}/delta.safetensors")


def test_stage_folders_are_cumulative(chain, train_world):
    s1, s2, s3 = (_delta(train_world.stage_dir("chain", s)) for s in (1, 2, 3))
    frozen_in = _delta(train_world.stage_dir("frozen_in", 3))
    proj = [k for k in s1 if k.startswith("input_proj.")]
    outs = [k for k in s2 if k.startswith("output_proj.")]
    assert proj and outs and not any(k.startswith("output_proj.") for k in s1)
    for k in proj:
        assert torch.equal(s2[k], s1[k])  # stage 2 does not train it but carries it
        assert torch.equal(frozen_in[k], s1[k])  # nor does this stage 3
        assert not torch.equal(s3[k], s1[k])  # the default stage 3 trains it: its trained values
        assert torch.equal(s3[k], dict(chain[3]["model"].named_parameters())[k])
    rows = "token_rows.head.signal"  # ... and the rows it trains are its own (lm_head rows always learn;
    # they may equal the chain's stage 3 when no batch of these steps holds a medium)
    assert not torch.equal(frozen_in[rows], s2[rows])
    recorded = stage_config(train_world.stage_dir("chain", 3)).train.init_from  # `previous`, resolved
    assert recorded == str(train_world.stage_dir("chain", 2))
    parts = json.loads((train_world.stage_dir("frozen_in", 3) / "stage.json").read_text())["parts"]
    assert {"input_proj", "lora", "output_proj.image", "token_rows.signal", "token_rows.tool"} <= set(parts)
    loaded = load_stage(train_world.stage_dir("frozen_in", 3))  # THE loader reads it strictly
    assert torch.equal(loaded.model.input_proj.net.weight, s1["input_proj.net.weight"])


def test_rank0_logging_files(chain, train_world):
    stage_dir = train_world.stage_dir("chain", 2)
    rows = read_jsonl(stage_dir / "metrics.jsonl")
    step_rows = [r for r in rows if "loss" in r]
    keys = {"step", "loss", "lm", "lr", "grad_norm", "tok_s"}
    keys |= {"samples_s", "real_token_fraction", "mem_mb", "mem_peak_mb", "step_s", "epoch"}
    align = {"align_image", "align_video", "align_audio"}
    # a window without a modality's targets has no align_<m> key (never a 0); each one shows up somewhere
    assert align <= {k for r in step_rows for k in r}
    for r in step_rows:
        assert keys <= set(r), keys - set(r)
        assert all(r[k] > 0 for k in align & set(r))
        assert r["tok_s"] > 0 and r["samples_s"] > 0 and 0 < r["real_token_fraction"] <= 1
        assert r["mem_peak_mb"] >= r["mem_mb"] > 0 and r["grad_norm"] > 0
    assert any(r.get("align_image", 0) > 0 for r in step_rows)  # stage 2's alignment term is live
    assert any("val_loss" in r for r in rows) and rows[0]["event"] == "start" and rows[-1]["event"] == "end"
    assert (stage_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(stage_dir.glob("wandb"))  # disabled: nothing written


def test_wandb_offline_writes_under_the_stage_folder(train_world):
    result = run(train_world.args(1, "wb", "logging.wandb_mode=offline", "train.max_steps=1"))
    runs = list((train_world.stage_dir("wb", 1) / "wandb").glob("offline-run-*"))
    assert result["steps"] == 1 and len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_tracker_is_silent_off_rank_0(tmp_path):
    t = Tracker(tmp_path, rank=1, total_steps=3, wandb_mode="offline")
    t.log({"loss": 1.0}, 1)
    t.advance(1)
    t.close()
    assert t._bar is None and list(tmp_path.iterdir()) == []


def test_cpu_runs_fp32(chain):
    cfg = chain[3]["loaded"].config
    ds = build_ds_config(cfg, world_size=1, on_gpu=False)
    assert ds["bf16"] == {"enabled": False} and compute_dtype(ds) == torch.float32
    assert DeepSpeedConfig(ds).bfloat16_config.enabled is False
    assert read_jsonl(chain[3]["stage_dir"] + "/metrics.jsonl")[0]["dtype"] == "torch.float32"
    assert {p.dtype for p in chain[3]["model"].parameters()} == {torch.float32}


def test_print_config_shows_sources(train_world, capsys):
    assert TRAIN.main(train_world.args(3, "pc", "train.micro_batch_size=3", "--print-config")) == 0
    text = capsys.readouterr().out
    assert "micro_batch_size: 3  # [override train.micro_batch_size]" in text
    assert "grad_accum: 2  # [config/stage_3.yaml]" in text
    assert "max_steps: 2  # [" + str(train_world.config) in text


def test_init_from_previous_needs_the_previous_stage(train_world):
    with pytest.raises(ValueError, match="holds no finished stage 1 of run 'lonely'"):
        run(train_world.args(2, "lonely"))


def test_resume_without_a_checkpoint_starts_fresh_and_a_finished_run_resumes_to_itself(train_world, caplog):
    with caplog.at_level(logging.WARNING):
        first = run(train_world.args(1, "fresh", "train.max_steps=1", "--resume"))
    assert first["steps"] == 1 and "no complete checkpoint" in caplog.text
    before = _delta(train_world.stage_dir("fresh", 1))
    again = run(train_world.args(1, "fresh", "train.max_steps=1", "--resume"))
    assert again["steps"] == 1  # loaded the final checkpoint: nothing left to train
    after = _delta(train_world.stage_dir("fresh", 1))
    assert all(torch.equal(before[k], after[k]) for k in before)
