"""Subprocess side of tests/model/test_feature_cache.py's multi-process test.

    python _cache_worker.py writer ROOT JOB      # encode JOB["images"] through a FeatureCache at ROOT
    python _cache_worker.py reader ROOT JOB      # poll ROOT, parsing every cache file, until JOB["done"] exists

Both wait for the file JOB["go"] after creating JOB["ready"] + their name, so the writers start together.
The result (a JSON dict) goes to JOB["out"] + their name.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _start(job: dict, name: str) -> None:
    Path(job["ready"] + name).touch()
    while not Path(job["go"]).exists():
        time.sleep(0.005)


def writer(root: str, job: dict, name: str) -> dict:
    from toollmm.core.config import load_config
    from toollmm.model.encoder import build_encoder
    from toollmm.model.feature_cache import FeatureCache

    cfg = load_config(config_files=["config/presets/encoder_tiny.yaml"]).config.model
    cache = FeatureCache(root, build_encoder(cfg), batch_size=1)
    _start(job, name)
    for path in job["images"]:  # one get per key: the two writers race key by key
        cache.get("image", path)
    return cache.stats


def reader(root: str, job: dict, name: str) -> dict:
    import numpy as np
    from safetensors.numpy import load  # no torch import: the reader stays light

    reads, errors = 0, []
    _start(job, name)
    while True:
        finished = Path(job["done"]).exists()  # checked before the last sweep, so it sees final files
        for path in Path(root).rglob("*.safetensors"):
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # listed, then replaced: fine, readers only need whole files
                continue
            try:
                feats = load(data)["features"]
                if feats.shape != (1, 32) or not np.isfinite(feats).all():
                    errors.append(f"{path}: bad tensor {tuple(feats.shape)}")
            except Exception as e:  # noqa: BLE001 - any failure to parse is a torn file
                errors.append(f"{path}: {type(e).__name__}: {e} ({len(data)} bytes)")
            reads += 1
        if finished:
            return {"reads": reads, "errors": errors}
        time.sleep(0.001)  # leave the two writers most of the machine


if __name__ == "__main__":
    role, root, job_file, name = sys.argv[1:5]
    job = json.loads(Path(job_file).read_text())
    result = {"writer": writer, "reader": reader}[role](root, job, name)
    Path(job["out"] + name).write_text(json.dumps(result))
