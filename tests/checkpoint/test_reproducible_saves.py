"""Saves are byte-reproducible (issue 16, item 9): equal tensors give equal files, so equal sha256 in
``stage.json`` and equal feature-cache files, in one process and across processes with different
PYTHONHASHSEED. (safetensors writes ``__metadata__`` from a Rust HashMap whose order changes per map.)"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import torch

from _media import write_image
from _repro_worker import save_all
from _train_world import child_env
from model_fixtures import build_tiny, write_tiny_llama
from toollmm.checkpoint.delta import load_delta

TESTS = Path(__file__).resolve().parents[1]


def _header(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n].decode()


def test_saves_are_byte_identical_in_and_across_processes(tmp_path, tiny_tokenizer_dir):
    llm = write_tiny_llama(tiny_tokenizer_dir, tmp_path / "llm")
    image = write_image(tmp_path / "i.png")
    runs = [save_all(str(llm), str(image), str(tmp_path / f"in{i}")) for i in range(3)]
    for seed in ("1",):
        out = tmp_path / f"proc{seed}"
        cmd = [sys.executable, str(TESTS / "_repro_worker.py"), str(llm), str(image), str(out)]
        subprocess.run(cmd, check=True, env=child_env(PYTHONHASHSEED=seed), cwd=TESTS, timeout=300)
        runs.append({k: out / p.relative_to(tmp_path / "in0") for k, p in runs[0].items()})
    for kind in ("delta", "adapter", "features"):
        blobs = {r[kind].read_bytes() for r in runs}
        assert len(blobs) == 1, f"{kind}: {len(blobs)} different files from 4 saves of the same tensors"
    meta = json.loads(_header(runs[0]["delta"]))["__metadata__"]
    assert list(meta) == sorted(meta) and {"format", "parts", "token_ids", "tied"} <= set(meta)
    # the canonical file is a normal safetensors file: it loads strictly into a fresh model
    fresh = build_tiny(llm, seed=3)
    load_delta(fresh, runs[-1]["delta"].parent)
    want = build_tiny(llm, seed=0)
    for k, v in want.input_proj.state_dict().items():
        assert torch.equal(fresh.input_proj.state_dict()[k], v), k


def test_canonical_bytes_keep_tensors_and_metadata():
    from toollmm.core.safefiles import safetensors_bytes

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16)}
    meta = {k: str(i) for i, k in enumerate("zyxwvu")}
    blobs = {safetensors_bytes(tensors, meta) for _ in range(8)}
    assert len(blobs) == 1
    from safetensors.torch import load

    blob = blobs.pop()
    assert blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]].startswith(b'{"__metadata__":{"u":"5","v":"4"')
    got = load(blob)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert struct.unpack("<Q", blob[:8])[0] % 8 == 0  # header padded as the library pads it
