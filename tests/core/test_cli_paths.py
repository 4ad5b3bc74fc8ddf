"""Paths typed on the command line resolve against the current directory; paths inside config values
(config files, ``--config`` layers, ``key=value`` overrides) against the repo root (issue 21, item 3).

Every check runs the real entry point in-process from a temporary working directory: before, ``--image
x.png`` read ``$PWD/x.png`` but ``--output-dir relout`` wrote ``<repo>/relout``; ``--config my.yaml`` was
looked up in the repo. A text-only request creates no (empty) output folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import toollmm
from entry_points import load_script
from inference_fixtures import IMAGE_SPAN, steer
from toollmm.core.config import load_config
from toollmm.core.paths import REPO_ROOT, resolve


def _entry(name: str):
    return load_script(f"code/{name}.py", f"{name}_paths_entry")


inference, evaluate, train = _entry("inference"), _entry("evaluate"), _entry("train")
RULES = [("draw", "Here it is. " + IMAGE_SPAN), ("hello", "Hello there.")]


def _loader(checkpoint, **kwargs):
    return steer(toollmm.load(checkpoint, **kwargs), RULES)


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_output_dir_and_batch_paths_are_taken_from_the_cwd(tiny_stage_dir, cwd, capsys):
    argv = [
        "--checkpoint",
        str(tiny_stage_dir),
        "--prompt",
        "draw a red circle",
        "--json",
        "--output-dir",
        "relout",
    ]
    assert inference.main(argv, loader=_loader) == 0
    res = json.loads(capsys.readouterr().out)
    assert [Path(m["path"]).parent for m in res["media"]] == [cwd / "relout"]
    assert (cwd / "relout" / "image_0.png").is_file() and not (REPO_ROOT / "relout").exists()

    (cwd / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n", encoding="utf-8")
    argv = [
        "--checkpoint",
        str(tiny_stage_dir),
        "--batch",
        "in.jsonl",
        "--out",
        "res/out.jsonl",
        "--output-dir",
        "m",
    ]
    assert inference.main(argv, loader=_loader) == 0
    [line] = (cwd / "res" / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["id"] == "a" and "Hello there." in json.loads(line)["text"]


def test_text_only_request_creates_no_output_folder(tiny_stage_dir, cwd, capsys, monkeypatch):
    import toollmm.infer.runtime as api

    monkeypatch.setattr(api, "OUTPUTS_DIR", cwd / "outputs")  # where the default <time>/ folder would go
    argv = ["--checkpoint", str(tiny_stage_dir), "--prompt", "hello", "--json"]
    assert inference.main(argv, loader=_loader) == 0
    assert json.loads(capsys.readouterr().out)["text"].strip() == "Hello there."
    assert not (cwd / "outputs").exists()
    argv += ["--output-dir", "media"]
    assert inference.main(argv, loader=_loader) == 0 and not (cwd / "media").exists()


def test_config_file_flag_is_taken_from_the_cwd(cwd, capsys):
    (cwd / "mine.yaml").write_text("run: {name: from-my-layer}\n", encoding="utf-8")
    assert train.main(["--stage", "1", "--config", "mine.yaml", "--print-config"]) == 0
    assert "from-my-layer" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a repo file typed from elsewhere: the error says where it is
        train.parse_args(["--stage", "1", "--config", "config/demo.yaml"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"{cwd / 'config' / 'demo.yaml'}: not found" in err and str(REPO_ROOT / "config" / "demo.yaml") in err
    )


def test_paths_in_config_values_and_overrides_stay_repo_relative(cwd):
    """``key=value`` overrides are config values: relative paths in them mean the same from any folder."""
    (cwd / "layer.yaml").write_text("model: {feature_cache: {dir: layer_cache}}\n", encoding="utf-8")
    cfg = load_config(config_files=[str(cwd / "layer.yaml")], overrides=["data.captions=my_caps"]).config
    assert resolve(cfg.model.feature_cache.dir) == REPO_ROOT / "layer_cache"
    assert resolve(cfg.data.captions) == REPO_ROOT / "my_caps"


def test_evaluate_outputs_and_demo_report_run_are_taken_from_the_cwd(cwd, capsys):
    from test_demo_eval import _fake_run

    _fake_run(cwd / "myrun")
    assert evaluate.main(["demo-report", "--run", "myrun", "--small"]) == 0
    assert (cwd / "myrun" / "metrics.json").is_file()
    capsys.readouterr()


def test_checkpoint_flag_is_a_local_folder_or_a_hub_id(cwd):
    from toollmm.core.paths import cli_checkpoint

    (cwd / "me").mkdir()
    (cwd / "me" / "run").mkdir()
    assert cli_checkpoint("me/run") == str(cwd / "me" / "run")  # the local folder wins
    assert cli_checkpoint("someone/model") == "someone/model"  # no such folder: a Hub id
    assert cli_checkpoint("outputs/demo/stage_3") == str(cwd / "outputs" / "demo" / "stage_3")
