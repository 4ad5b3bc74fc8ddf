"""The feature pre-pass at cluster scale: ``prepare_data.py encode`` fills the cache offline (resumable,
counted per modality), after which a stage trains with zero encoder forwards and never builds the encoder;
a stage whose data has no media never builds it; ranks split the uncached media with no duplicate work."""

from __future__ import annotations

import json
import random

import pytest

from _train_world import TINY_ENCODER, read_jsonl
from entry_points import load_script
from toollmm.core.config import load_config
from toollmm.core.paths import REPO_ROOT
from toollmm.train.build import has_media
from toollmm.train.features import owned_keys


def _entry(name: str):
    return load_script(f"code/{name}.py", f"{name}_entry")


PREPARE = _entry("prepare_data")
TRAIN = _entry("train")


def _encode(world, cache, capsys, *extra: str) -> dict:
    args = ["encode", "--config", TINY_ENCODER, "--config", str(world.config), "--stage", "1"]
    assert PREPARE.main([*args, *extra, f"model.feature_cache.dir={cache}"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stage_1"]


def test_encode_fills_the_cache_and_stage_1_then_never_runs_the_encoder(train_world, tmp_path, capsys):
    cache = tmp_path / "features"
    first = _encode(train_world, cache, capsys)
    assert set(first["media"]) == {"image", "audio", "video"}
    for m, c in first["media"].items():
        assert c["encoded"] > 0 and c["failed"] == 0, (m, c)
    assert first["encoder_built"] and first["encoder_forwards"] > 0
    assert first["cache"].endswith("-float32")  # CPU: fp32, the identity a CPU training run looks up

    again = _encode(train_world, cache, capsys)  # resumable: everything is found, nothing is encoded
    assert not again["encoder_built"] and again["encoder_forwards"] == 0
    for m, c in again["media"].items():
        assert c == {"encoded": 0, "cached": first["media"][m]["encoded"], "failed": 0}, m

    args = train_world.args(
        1, "prepass", "train.max_steps=1", f"model.feature_cache.dir={cache}", init_from=None
    )
    assert TRAIN.main(args) == 0
    start = read_jsonl(train_world.stage_dir("prepass", 1) / "metrics.jsonl")[0]
    assert start["event"] == "start"
    assert start["features"]["encoder_forwards"] == 0
    assert start["features"]["encoder_built"] is False
    cached = {m: c["cached"] for m, c in start["features"]["media"].items()}
    assert all(n > 0 for n in cached.values()) and set(cached) == {"image", "audio", "video"}


def test_a_stage_without_media_never_builds_the_encoder(train_world, tmp_path):
    from toollmm.data.shards import write_shards
    from toollmm.data.sources import JsonlSource

    def cfg(stage, *overrides):
        files = [TINY_ENCODER, str(train_world.config)]
        return load_config(stage=stage, config_files=files, overrides=list(overrides)).config

    assert has_media(cfg(1)) and not has_media(cfg(2))
    for name, want in (("t2x_image", False), ("x2t_image", True)):
        src = JsonlSource(train_world.demo / "train" / f"{name}.jsonl", media_root=train_world.demo)
        write_shards(src, tmp_path / name, shard_size=50)
        shard = f"data.train=[{{path: {tmp_path / name}}}]"
        assert has_media(cfg(2, shard, "data.heldout=[]")) is want, name


def test_ranks_split_uncached_media_without_duplicates():
    rng = random.Random(0)
    keys = [f"{rng.getrandbits(256):064x}" for _ in range(400)]
    for world in (1, 2, 3, 8):
        per_rank = [sorted(set(rng.sample(keys, 120))) for _ in range(world)]
        owned = [owned_keys(per_rank, r) for r in range(world)]
        assert sum(len(o) for o in owned) == len(set().union(*map(set, per_rank)))  # each key exactly once
        for r, o in enumerate(owned):
            assert o <= set(per_rank[r])  # only by a rank that holds its bytes
        if world > 1:
            assert min(len(o) for o in owned) > 0  # the work is spread


@pytest.mark.parametrize("bad", ["image"])
def test_encode_counts_failed_media_under_skip(train_world, tmp_path, capsys, bad):
    lines = (train_world.demo / "train" / "x2t_image.jsonl").read_text().splitlines()[:4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rec = json.loads(lines[0])
    rec["images"] = [str(broken)]
    data = tmp_path / "x2t.jsonl"
    data.write_text("\n".join([*lines[1:], json.dumps(rec)]) + "\n")
    source = f"data.train=[{{path: {data}, media_root: {train_world.demo}}}]"
    out = _encode(train_world, tmp_path / "f", capsys, source, "data.heldout=[]", "data.on_error=skip")
    assert out["media"][bad] == {"encoded": 3, "cached": 0, "failed": 1}


def test_two_ranks_encode_each_medium_once(train_world, tmp_path):
    """``prepare_data.py encode`` under two gloo ranks (as torchrun starts it) over a source listed twice:
    every distinct medium is encoded exactly once over both ranks, and the cache holds one file each."""
    import os
    import subprocess
    import sys

    from _train_world import child_env, free_port

    path = train_world.demo / "train" / "x2t_image.jsonl"
    import hashlib

    images = [img for line in path.read_text().splitlines() for img in json.loads(line)["images"]]
    distinct = {hashlib.sha256((train_world.demo / img).read_bytes()).hexdigest() for img in images}
    src = f"{{path: {path}, media_root: {train_world.demo}}}"
    cache = tmp_path / "features"
    cmd = [sys.executable, str(REPO_ROOT / "code" / "prepare_data.py"), "encode", "--config", TINY_ENCODER,
           "--config", str(train_world.config), "--stage", "1", f"data.train=[{src}, {src}]", "data.heldout=[]",
           f"model.feature_cache.dir={cache}"]  # fmt: skip
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180))
        finally:
            if p.poll() is None:
                os.kill(p.pid, 9)
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    summary = json.loads(outs[0][0].strip().splitlines()[-1])["stage_1"]
    assert summary["media"]["image"] == {"encoded": len(distinct), "cached": 0, "failed": 0}
    assert summary["duplicates"] == 2 * len(images) - len(distinct)  # met again: never re-encoded
    assert len(list(cache.rglob("*.safetensors"))) == len(distinct)
