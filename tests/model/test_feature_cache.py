"""The on-disk feature cache: content-addressed keys, hits and misses, atomic writes, several processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from _media import write_image, write_mp4, write_wav
from toollmm.core.config import load_config
from toollmm.core.files import atomic_write_bytes
from toollmm.data.preprocess import MediaError, load_media
from toollmm.model.encoder import build_encoder
from toollmm.model.feature_cache import FeatureCache

TINY = "config/presets/encoder_tiny.yaml"
TESTS = Path(__file__).resolve().parents[1]


def encoder(*overrides: str):
    return build_encoder(load_config(config_files=[TINY], overrides=list(overrides)).config.model)


@pytest.fixture(scope="module")
def tiny():
    return encoder()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    frames = [write_image(d / f"frame{i}.png", 64, 48, seed=i) for i in range(4)]
    return {
        "image": write_image(d / "i.png"),
        "image2": write_image(d / "j.png", seed=1),
        "audio": write_wav(d / "a.wav"),
        "video": write_mp4(d / "v.mp4"),
        "frames": frames,
    }


def test_miss_then_hit_equals_a_fresh_encode(tiny, media, tmp_path):
    cache = FeatureCache(tmp_path, tiny)
    for modality, src in [("image", media["image"]), ("audio", media["audio"]), ("video", media["video"])]:
        fresh = tiny.encode(modality, load_media(modality, src, tiny.preprocess)[None])[0]
        first = cache.get(modality, src)
        assert torch.equal(first, fresh)
        assert torch.equal(cache.get(modality, src), first)
    assert cache.stats == {"hits": 3, "misses": 3, "writes": 3}
    key = cache.key("image", media["image"])
    path = tmp_path / tiny.identity / "pooled" / "image" / key[:2] / f"{key}.safetensors"
    with safe_open(path, "pt") as f:
        assert f.metadata()["source"] == str(media["image"]) and f.metadata()["key"] == key
        assert f.get_tensor("features").shape == (1, tiny.out_dim)
    assert not list(tmp_path.rglob("*.tmp")), "temp files left behind"


def test_keys_follow_content_encoder_output_and_settings(tiny, media, tmp_path):
    cache = FeatureCache(tmp_path, tiny)
    key = cache.key("image", media["image"])
    copy = tmp_path / "renamed.png"
    copy.write_bytes(media["image"].read_bytes())
    assert cache.key("image", copy) == key, "content-addressed: the path does not matter"
    assert cache.key("image", media["image"].read_bytes()) == key
    assert cache.key("image", media["image2"]) != key
    assert cache.key("video", media["image"]) != key
    for other in ["model.encoder.seed=1", "model.encoder.output=tokens"]:
        assert FeatureCache(tmp_path, encoder(other)).key("image", media["image"]) != key, other
    shorter = FeatureCache(tmp_path, encoder("model.preprocess.audio_clips=2"))
    assert shorter.key("image", media["image"]) == key, "audio settings do not touch image keys"
    assert shorter.key("audio", media["audio"]) != cache.key("audio", media["audio"])
    frames = media["frames"]
    assert cache.key("video", frames) != cache.key("video", frames[::-1]), "frame order matters"


def test_get_many_mixes_hits_and_misses_in_order(tiny, media, tmp_path):
    cache = FeatureCache(tmp_path, tiny, batch_size=2)
    sources = [media["frames"], media["video"], media["frames"][:2]]
    cache.get("video", media["video"])
    out = cache.get_many("video", sources)
    assert out.shape == (3, 1, tiny.out_dim)
    assert cache.stats == {"hits": 1, "misses": 3, "writes": 3}
    for i, src in enumerate(sources):
        assert torch.equal(out[i], cache.get("video", src))
    tokens = FeatureCache(tmp_path, encoder("model.encoder.output=tokens"))
    assert tokens.get_many("video", sources).shape == (3, 5, tiny.out_dim)
    assert tokens.get_many("audio", []).shape == (0, 3, tiny.out_dim)


def test_bad_media_and_bad_cache_files(tiny, media, tmp_path, caplog):
    cache = FeatureCache(tmp_path, tiny)
    with pytest.raises(MediaError, match="missing.png: file not found"):
        cache.get("image", tmp_path / "missing.png")
    with pytest.raises(MediaError, match="gone.png: file not found"):
        cache.get_many("video", [[*media["frames"][:1], tmp_path / "gone.png"]])
    good = cache.get("image", media["image"])
    path = cache.path("image", cache.key("image", media["image"]))
    path.write_bytes(b"not safetensors")  # e.g. a foreign tool wrote here
    assert torch.equal(cache.get("image", media["image"]), good)
    assert "unreadable" in caplog.text and cache.writes == 2
    assert torch.equal(FeatureCache(tmp_path, tiny).get("image", media["image"]), good)


def test_atomic_write_never_shows_a_partial_file(tmp_path):
    """Two threads keep replacing one 4 MB file with different contents while a third reads it:
    every read is one whole version (a plain open/write would expose truncated files)."""
    path = tmp_path / "blob"
    versions = [bytes([i]) * (4 << 20) for i in (1, 2)]
    atomic_write_bytes(path, versions[0])
    stop = threading.Event()
    bad: list[int] = []

    def write(data: bytes) -> None:
        for _ in range(15):
            atomic_write_bytes(path, data)

    def read() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            if data not in versions:
                bad.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(v,)) for v in versions]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert not bad, f"partial reads of sizes {bad[:5]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]


@pytest.mark.slow  # ~14 s on an idle 2-core machine (three interpreters importing torch), 40 s when busy
def test_two_processes_write_the_same_keys(tiny, tmp_path):
    """Two writer processes encode the same 16 images at the same moment through one cache folder
    while a third process parses every cache file it can see."""
    images = [str(write_image(tmp_path / f"img{i}.png", 96, 64, seed=i)) for i in range(16)]
    root = tmp_path / "cache"
    job = {
        "images": images,
        "go": str(tmp_path / "go"),
        "done": str(tmp_path / "done"),
        "ready": str(tmp_path / "ready-"),
        "out": str(tmp_path / "out-"),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    roles = {"w1": "writer", "w2": "writer", "r": "reader"}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "_cache_worker.py"),
                role,
                str(root),
                str(tmp_path / "job.json"),
                name,
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, role in roles.items()
    }
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{n}").exists() for n in roles):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), {
                n: p.stderr.read() for n, p in procs.items() if p.poll() is not None
            }
            time.sleep(0.05)
        Path(job["go"]).touch()
        for name in ("w1", "w2"):
            assert procs[name].wait(timeout=120) == 0, procs[name].stderr.read()
        Path(job["done"]).touch()
        assert procs["r"].wait(timeout=60) == 0, procs["r"].stderr.read()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    stats = {n: json.loads((tmp_path / f"out-{n}").read_text()) for n in roles}
    assert stats["r"]["errors"] == [] and stats["r"]["reads"] > 0
    for name in ("w1", "w2"):
        assert stats[name]["hits"] + stats[name]["misses"] == len(images)
    writes = stats["w1"]["writes"] + stats["w2"]["writes"]
    assert len(images) <= writes <= 2 * len(images)
    assert not list(root.rglob("*.tmp")), "temp files left behind"
    assert len(list(root.rglob("*.safetensors"))) == len(images)
    cache = FeatureCache(root, tiny)
    cached = cache.get_many("image", images)
    assert cache.stats == {"hits": len(images), "misses": 0, "writes": 0}
    fresh = tiny.encode("image", torch.stack([load_media("image", p, tiny.preprocess) for p in images]))
    assert torch.allclose(cached, fresh, atol=1e-6)
