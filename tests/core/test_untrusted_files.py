"""No file the project loads runs code (issue 16, item 1).

A pickle ``__reduce__`` payload that would create a marker file is planted in every file type the
project reads -- our resume state, DeepSpeed's model and optimiser shards, the feature cache, the
caption cache, an LLM ``pytorch_model.bin``, a LoRA ``adapter_model.bin``, an ImageBind ``.pth`` and a
diffusers component ``.bin`` -- and each load is refused naming the file, with the marker never created.
Each payload is first shown to be live: the unsafe ``torch.load(weights_only=False)`` does run it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import deepspeed
import numpy as np
import pytest
import torch

from model_fixtures import build_tiny, write_tiny_llama
from toollmm.checkpoint.delta import load_delta, save_delta
from toollmm.core.config import DecoderConfig, LLMConfig, load_config
from toollmm.core.safefiles import UnsafeFileError
from toollmm.data.captions import CaptionStore
from toollmm.data.records import BadSample
from toollmm.model.decoders import DecoderPool
from toollmm.model.encoder import CheckpointError, build_encoder, load_imagebind_checkpoint
from toollmm.model.feature_cache import FeatureCache
from toollmm.model.llm import load_causal_lm
from toollmm.train.ds import build_ds_config, compute_dtype, init_distributed
from toollmm.train.resume import ResumeCheckpoints, ResumeError
from toollmm.train.schedule import make_scheduler


class Payload:
    """Unpickling this calls ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD_RAN"


def plant(path: Path, marker: Path, inner=None) -> None:
    """Overwrite ``path`` with a torch pickle holding ``inner`` plus the payload, and prove it is live."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"real": inner, "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the unsafe load a checkpoint must never get
    assert marker.exists(), "the payload is not live: the test would prove nothing"
    marker.unlink()


# ----------------------------------------------------------------------------- resume folders
@pytest.fixture(scope="module")
def dist():
    return init_distributed()


def _engine(ds_json: str = "dsconfig/stage_1.json", seed: int = 0):
    """A tiny engine; on a GPU host with the dsconfig's bf16 on (so the shards hold what a real run's do)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))
    cfg = load_config(
        stage=1, overrides=["train.micro_batch_size=4", f"train.deepspeed_config={ds_json}"]
    ).config
    ds = build_ds_config(cfg, world_size=1)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=list(model.parameters()),
        config=ds,
        lr_scheduler=lambda opt: make_scheduler(opt, 20, cfg.train.optim),
    )
    engine.test_dtype = compute_dtype(ds)
    return engine


def _train(engine, steps: int) -> None:
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 8, generator=g).to(engine.device, engine.test_dtype)
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()


def _saved(tmp_path, ds_json="dsconfig/stage_1.json") -> tuple[ResumeCheckpoints, Path]:
    engine = _engine(ds_json)
    _train(engine, 2)
    ck = ResumeCheckpoints(tmp_path / "ckpt", rank=0, local_rank=0)
    return ck, ck.save(engine, 2, {"data": {"consumed": 8}})


@pytest.mark.parametrize("ds_json", ["dsconfig/stage_1.json", "dsconfig/zero3.json"])
def test_resume_round_trip_needs_no_pickle(tmp_path, dist, ds_json):
    """ZeRO-2 and ZeRO-3 shards load through the weights_only engine; our state is JSON + safetensors."""
    ck, folder = _saved(tmp_path, ds_json)
    assert sorted(p.name for p in folder.glob("rank0_*")) == ["rank0_rng.safetensors", "rank0_state.json"]
    assert json.loads((folder / "rank0_state.json").read_text())["data"] == {"consumed": 8}
    want = [p.detach().clone() for p in _engine_after(ds_json).module.parameters()]
    resumed = _engine(ds_json, seed=7)
    torch.manual_seed(123)
    state = ck.load(resumed)
    assert state["step"] == 2 and state["data"] == {"consumed": 8}
    assert type(resumed.checkpoint_engine).__name__ == "SafeCheckpointEngine"
    for a, b in zip(want, resumed.module.parameters()):
        assert torch.equal(a, b)


def _engine_after(ds_json):
    engine = _engine(ds_json)
    _train(engine, 2)
    return engine


@pytest.mark.parametrize(
    "victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_payload_in_a_deepspeed_shard_is_refused(tmp_path, dist, marker, victim):
    ck, folder = _saved(tmp_path)
    real = torch.load(folder / victim, weights_only=False)
    plant(folder / victim, marker, real)
    with pytest.raises(UnsafeFileError, match=victim) as err:
        ck.load(_engine())
    assert "posix.system" in str(err.value) or "system" in str(err.value)
    assert not marker.exists()


def test_payload_in_resume_state_is_refused(tmp_path, dist, marker):
    ck, folder = _saved(tmp_path)
    # a folder in the old pickle format (rank0_state.pt): refused before anything is unpickled
    (folder / "rank0_state.json").unlink()
    plant(folder / "rank0_state.pt", marker, {"step": 2})
    with pytest.raises(ResumeError, match="rank0_state.pt"):
        ck.load(_engine())
    assert not marker.exists()
    # a payload where our safetensors RNG file should be
    ck, folder = _saved(tmp_path / "b")
    plant(folder / "rank0_rng.safetensors", marker, {"torch": torch.get_rng_state()})
    with pytest.raises(ResumeError, match="rank0_rng.safetensors"):
        ck.load(_engine())
    assert not marker.exists()


# ------------------------------------------------------------------------------- data caches
def test_payload_in_feature_cache_is_refused_and_re_encoded(tmp_path, marker, caplog):
    from _media import write_image

    enc = build_encoder(load_config(config_files=["config/presets/encoder_tiny.yaml"]).config.model)
    image = write_image(tmp_path / "i.png")
    cache = FeatureCache(tmp_path / "cache", enc)
    want = cache.get("image", image)
    path = cache.path("image", cache.key("image", image))
    plant(path, marker, want)
    with caplog.at_level(logging.WARNING):
        got = cache.get("image", image)
    assert torch.equal(got, want) and cache.stats["misses"] == 2  # refused, re-encoded, rewritten
    assert str(path) in caplog.text and "unreadable" in caplog.text
    assert not marker.exists()


def test_payload_in_caption_cache_is_refused(tmp_path, marker):
    store = CaptionStore(tmp_path)
    path = store.path("ab" * 16)
    path.parent.mkdir(parents=True)
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    np.load(path, allow_pickle=True)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(BadSample, match=str(path)):
        store.get("ab" * 16, "rec 1")
    assert not marker.exists()


# ----------------------------------------------------------------------------- base models
def test_payload_in_llm_bin_is_refused_naming_it(tmp_path, tiny_tokenizer_dir, marker):
    llm = write_tiny_llama(tiny_tokenizer_dir, tmp_path / "llm")
    for f in llm.glob("*.safetensors"):
        f.unlink()
    plant(llm / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin"):
        load_causal_lm(LLMConfig(path=str(llm), dtype="float32", attn_implementation="eager"))
    assert not marker.exists()


def test_payload_in_adapter_bin_is_refused_naming_it(tmp_path, tiny_tokenizer_dir, marker):
    llm = write_tiny_llama(tiny_tokenizer_dir, tmp_path / "llm")
    save_delta(build_tiny(llm), tmp_path / "delta", parts={"lora"})
    adapter = tmp_path / "delta" / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    plant(adapter / "adapter_model.bin", marker)
    with pytest.raises(UnsafeFileError, match="adapter_model.bin"):
        load_delta(build_tiny(llm, seed=1), tmp_path / "delta")
    assert not marker.exists()


def test_payload_in_imagebind_pth_is_refused(tmp_path, marker):
    path = tmp_path / "imagebind_huge.pth"
    plant(path, marker)
    with pytest.raises(CheckpointError, match="imagebind_huge.pth"):
        load_imagebind_checkpoint(torch.nn.Linear(2, 2), path)
    assert not marker.exists()


def test_payload_in_decoder_bin_is_refused_naming_it(tmp_path, marker):
    from toollmm.model.tiny_decoders import build_tiny_decoders

    folder = build_tiny_decoders(tmp_path, modalities=["image"])["image"]
    for f in (folder / "text_encoder").glob("*.safetensors"):
        f.unlink()
    plant(folder / "text_encoder" / "pytorch_model.bin", marker)
    pool = DecoderPool({"image": DecoderConfig(path=str(folder))})
    with pytest.raises(UnsafeFileError, match="text_encoder/pytorch_model.bin"):
        pool.pipeline("image")
    assert not marker.exists()


def test_a_checkpoint_config_cannot_choose_tool_code(tmp_path, caplog):
    """``inference.tool_imports`` imports modules: it comes from the user, never from a stage folder."""
    import yaml

    from toollmm.checkpoint.stage import stage_config
    from toollmm.core import configlib

    tree = configlib.to_dict(load_config().config)
    tree["inference"]["tool_imports"] = ["evil_module:tool"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    with caplog.at_level(logging.WARNING):
        cfg = stage_config(tmp_path, config_files=[])
    assert cfg.inference.tool_imports == [] and "evil_module:tool" in caplog.text
    assert stage_config(
        tmp_path, overrides=["inference.tool_imports=[mine:tool]"]
    ).inference.tool_imports == ["mine:tool"]


def test_a_checkpoint_config_keeps_tool_imports_of_this_package_only(tmp_path, caplog):
    """A demo stage folder saves ``tool_imports: [toollmm.demo.toolset]`` (code installed with toollmm):
    that entry stays, every other one is dropped with a warning naming it."""
    import yaml

    from toollmm.checkpoint.stage import stage_config
    from toollmm.core import configlib

    tree = configlib.to_dict(load_config().config)
    tree["inference"]["tool_imports"] = ["toollmm.demo.toolset", "toollmm_evil:tool", "evil.toollmm:tool"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    with caplog.at_level(logging.WARNING):
        cfg = stage_config(tmp_path, config_files=[])
    assert cfg.inference.tool_imports == ["toollmm.demo.toolset"]
    assert "toollmm_evil:tool" in caplog.text and "evil.toollmm:tool" in caplog.text
    assert "'toollmm.demo.toolset'" not in caplog.text
