"""Base-model hashes are checked on load (issue 16, item 7): a stage saved on base LLM A and loaded on base B
is refused, naming both sha256 and the path (``load_stage`` / ``toollmm.load`` and training's
``init_from``), unless ``model.allow_base_mismatch=true`` (then it loads, with a warning); the permission
is never inherited from a saved config; the hashes are memoised by path, size and mtime."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import yaml

import toollmm
from _train_world import run_train
from inference_fixtures import TINY_LLM, build_tiny_stage, tiny_overrides
from toollmm.checkpoint.bases import hash_tree
from toollmm.checkpoint.stage import BaseMismatchError, load_stage, read_manifest
from toollmm.core.config import load_config
from toollmm.model.tiny import write_llm


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_dir):
    """A stage saved on base LLM A (``root/base/llm``) and another LLM B of the same shape and vocabulary."""
    root = tmp_path_factory.mktemp("base_hash")
    stage = build_tiny_stage(root, tiny_tokenizer_dir)
    llm_b = write_llm(root / "llm_b", tiny_tokenizer_dir, TINY_LLM, seed=1)
    return {"root": root, "stage": stage, "llm_a": root / "base" / "llm", "llm_b": llm_b}


def hashing_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "toollmm.core.files" and "hashing" in r.msg]


def test_stage_loaded_on_another_llm_is_refused_naming_both_hashes(world):
    stage, llm_b = world["stage"], world["llm_b"]
    trained = read_manifest(stage)["base_models"]["llm"]["sha256"]
    other = hash_tree(llm_b)
    assert trained == hash_tree(world["llm_a"]) != other
    with pytest.raises(BaseMismatchError) as e:
        load_stage(stage, overrides=[f"model.llm.path={llm_b}"])
    msg = str(e.value)
    assert trained in msg and other in msg and str(llm_b) in msg and str(stage) in msg
    assert "model.llm.path" in msg and "model.allow_base_mismatch=true" in msg
    with pytest.raises(BaseMismatchError, match=other):  # the user-facing loader too
        toollmm.load(stage, overrides=[f"model.llm.path={llm_b}"], output_dir=world["root"] / "inf")
    assert load_stage(stage).model is not None  # on its own base it loads


def test_override_loads_with_a_warning(world, caplog):
    stage, llm_b = world["stage"], world["llm_b"]
    caplog.set_level(logging.WARNING, logger="toollmm.checkpoint")
    loaded = load_stage(stage, overrides=[f"model.llm.path={llm_b}", "model.allow_base_mismatch=true"])
    assert loaded.config.model.llm.path == str(llm_b)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(hash_tree(llm_b) in w and "allow_base_mismatch" in w for w in warned), warned


def test_permission_is_not_inherited_from_a_saved_config(world, tmp_path):
    copy = tmp_path / "stage"
    shutil.copytree(world["stage"], copy)
    tree = yaml.safe_load((copy / "config.yaml").read_text())
    tree["model"]["allow_base_mismatch"] = True
    (copy / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(BaseMismatchError, match=hash_tree(world["llm_b"])):
        load_stage(copy, overrides=[f"model.llm.path={world['llm_b']}"], verify=False)


def test_hash_is_memoised_by_path_size_and_mtime(world, tmp_path, caplog):
    """A fresh copy of base A (same bytes, new path): hashed once on the first load, not on the second;
    a new mtime hashes it again."""
    llm = tmp_path / "llm_copy"
    shutil.copytree(world["llm_a"], llm)
    caplog.set_level(logging.INFO, logger="toollmm.core.files")
    load_stage(world["stage"], overrides=[f"model.llm.path={llm}"])
    first = hashing_records(caplog)
    assert first and all(str(llm) in m for m in first), first
    caplog.clear()
    load_stage(world["stage"], overrides=[f"model.llm.path={llm}"])
    assert hashing_records(caplog) == []  # memo hit: nothing read
    weights = llm / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_stage(world["stage"], overrides=[f"model.llm.path={llm}"])
    assert [m for m in hashing_records(caplog) if "model.safetensors" in m]


def test_training_init_from_a_stage_of_another_base_is_refused(world, tmp_path):
    """``train.init_from`` through the real recipe: refused before anything is built or trained."""
    from toollmm.train.loop import run_stage

    over = tiny_overrides(world["root"] / "base")
    over += [f"model.llm.path={world['llm_b']}", f"train.init_from={world['stage']}"]
    over += [f"run.output_root={tmp_path}", "run.name=r"]
    loaded = load_config(stage=3, config_files=["config/presets/encoder_tiny.yaml"], overrides=over)
    with pytest.raises(BaseMismatchError, match=hash_tree(world["llm_b"])):
        run_stage(loaded)
    assert sorted(p.name for p in (tmp_path / "r" / "stage_3").iterdir()) == ["train.lock"]
    log = tmp_path / "train.log"  # the entry point: one line naming both hashes, exit 2
    code = run_train(["--stage", "3", "--config", "config/presets/encoder_tiny.yaml", *over], log, 300)
    text = log.read_text()
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert (
        hash_tree(world["llm_b"]) in text
        and read_manifest(world["stage"])["base_models"]["llm"]["sha256"] in text
    )
