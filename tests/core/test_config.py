"""The typed config: layering, provenance, strictness, and every shipped YAML/JSON loading."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from toollmm.core import configlib
from toollmm.core.config import Config, ConfigError, load_config
from toollmm.core.paths import CONFIG_DIR, DSCONFIG_DIR, REPO_ROOT, resolve


def test_every_shipped_yaml_and_json_parses():
    yamls = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {p.name for p in yamls} >= {
        "model.yaml",
        "stage_1.yaml",
        "stage_2.yaml",
        "stage_3.yaml",
        "inference.yaml",
    }
    for p in yamls:
        assert isinstance(yaml.safe_load(p.read_text()), dict), p
    jsons = sorted(DSCONFIG_DIR.glob("*.json"))
    assert jsons
    for p in jsons:
        assert isinstance(json.loads(p.read_text()), dict), p


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_resolves(stage):
    loaded = load_config(stage=stage)
    cfg = loaded.config
    assert cfg.run.stage == stage
    assert cfg.train.deepspeed_config == f"dsconfig/stage_{stage}.json"
    assert cfg.train.trainable, "a stage must say what it trains"
    assert loaded.sources["train.trainable"] == f"config/stage_{stage}.yaml"
    assert loaded.sources["model.llm.lora.r"] == "config/model.yaml"


def test_other_yaml_layers_resolve():
    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        if p.name in {"model.yaml"} or p.name.startswith("stage_"):
            continue
        for stage in (None, 1, 2, 3):
            load_config(stage=stage, config_files=[p])


def test_model_yaml_describes_the_real_system():
    cfg = load_config().config
    assert cfg.model.encoder.preset == "huge"
    assert cfg.model.encoder.checkpoint.endswith("imagebind_huge.pth")
    assert cfg.model.llm.path.endswith("vicuna_7b")
    assert (cfg.model.llm.lora.r, cfg.model.llm.lora.alpha, cfg.model.llm.lora.dropout) == (32, 32, 0.1)
    assert (
        cfg.model.tokens.num_image_signal,
        cfg.model.tokens.num_video_signal,
        cfg.model.tokens.num_audio_signal,
    ) == (4, 24, 8)
    assert set(cfg.model.decoders) == {"image", "video", "audio"}


def test_overrides_win_and_are_typed():
    loaded = load_config(
        stage=3,
        overrides=[
            "train.optim.lr=1e-4",
            "model.llm.lora.r=8",
            "data.packing=false",
            "train.trainable=[lora]",
        ],
    )
    cfg = loaded.config
    assert cfg.train.optim.lr == pytest.approx(1e-4) and isinstance(cfg.train.optim.lr, float)
    assert cfg.model.llm.lora.r == 8
    assert cfg.data.packing is False
    assert cfg.train.trainable == ["lora"]
    assert loaded.sources["train.optim.lr"] == "override train.optim.lr"


def test_every_problem_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  llm:\n    lora:\n      rank: 8\n  encoder:\n    output: mean\ntrain:\n  micro_batch_size: many\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(config_files=[bad], overrides=["data.nope=1"])
    text = str(e.value)
    assert len(e.value.problems) == 4, text
    assert "model.llm.lora.rank: unknown key" in text and "bad.yaml" in text
    assert "model.encoder.output: 'mean' is not one of ['pooled', 'tokens']" in text
    assert "train.micro_batch_size: expected an integer" in text
    assert "data.nope: unknown key (from override data.nope)" in text


def test_preset_stage_blocks_apply_only_to_their_stage(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  micro_batch_size: 2\nstages:\n  2:\n    train:\n      micro_batch_size: 7\n")
    assert load_config(stage=1, config_files=[preset]).config.train.micro_batch_size == 2
    loaded = load_config(stage=2, config_files=[preset])
    assert loaded.config.train.micro_batch_size == 7
    assert loaded.sources["train.micro_batch_size"].endswith("preset.yaml#stages.2")
    bad = tmp_path / "bad_stage.yaml"
    bad.write_text("stages:\n  9: {}\n")
    with pytest.raises(ConfigError, match="stages.9: unknown stage"):
        load_config(stage=1, config_files=[bad])


def test_print_config_shows_sources_and_help():
    text = load_config(stage=1, overrides=["run.name=abc"]).describe()
    assert "name: abc  # [override run.name]" in text
    assert "[config/stage_1.yaml]" in text
    assert "[default]" in text
    assert "LoRA rank" in text


def test_every_field_is_documented():
    undocumented = [name for name, help_ in configlib.documented_fields(Config) if not help_.strip()]
    assert undocumented == []


def test_round_trip_through_dict_is_strict():
    from toollmm.core.config import from_dict

    cfg = load_config(stage=3).config
    tree = configlib.to_dict(cfg)
    assert configlib.to_dict(from_dict(tree)) == tree
    tree["train"]["bogus"] = 1
    with pytest.raises(ConfigError, match="train.bogus"):
        from_dict(tree)


def test_paths_resolve_against_repo_root_not_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("config/model.yaml") == REPO_ROOT / "config" / "model.yaml"
    assert str(resolve("/abs/x")) == "/abs/x"
    assert load_config(stage=1).config.run.stage == 1  # found config/ although cwd is elsewhere


def test_package_imports_from_anywhere(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import toollmm, toollmm.core.paths as p; print(p.REPO_ROOT)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(REPO_ROOT)
