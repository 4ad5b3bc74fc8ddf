"""The frozen ImageBind encoder: the package's real model, huge layout, strict loading, frozen outputs."""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction

import pytest
import torch
from torch import nn

from toollmm.core.config import ConfigError, EncoderDims, load_config
from toollmm.core.files import sha256_file, sha256_memoised
from toollmm.model.encoder import (
    CheckpointError,
    build_encoder,
    build_imagebind,
    huge_kwargs,
    load_imagebind_checkpoint,
    model_kwargs,
)

TINY = "config/presets/encoder_tiny.yaml"


def tiny_cfg(*overrides: str):
    return load_config(config_files=[TINY], overrides=list(overrides)).config.model


@pytest.fixture(scope="module")
def tiny():
    return build_encoder(tiny_cfg())


@pytest.fixture(scope="module")
def huge_layout():
    """The package's own imagebind_huge(pretrained=False), parameters on the meta device."""
    from accelerate import init_empty_weights
    from imagebind.models.imagebind_model import imagebind_huge

    huge_kwargs()  # imports the package through toollmm.core.compat
    with init_empty_weights():
        model = imagebind_huge(pretrained=False)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- huge preset
@pytest.mark.parametrize("stage", [None, 1, 2, 3])
def test_tiny_preset_layers_on_every_stage(stage):
    enc = load_config(stage=stage, config_files=[TINY]).config.model.encoder
    assert enc.preset == "tiny" and enc.checkpoint is None and enc.dims.out_embed_dim == 32


def test_config_defaults_are_the_package_huge_dims():
    huge = huge_kwargs()
    ours = dataclasses.asdict(EncoderDims())
    assert ours == {k: huge[k] for k in ours}
    model_kwargs(load_config().config.model)  # config/model.yaml passes the enforcement


def test_huge_preset_rejects_other_dims():
    with pytest.raises(ConfigError, match=r"dims.vision_embed_dim: 64 differs from imagebind_huge's 1280"):
        load_config(overrides=["model.encoder.dims.vision_embed_dim=64"])
    cfg = load_config(overrides=["model.preprocess.audio_target_length=100"]).config.model
    with pytest.raises(ConfigError, match="audio_target_len=100 but imagebind_huge uses 204"):
        model_kwargs(cfg)
    with pytest.raises(ConfigError, match="image_size: 256"):
        model_kwargs(tiny_cfg("model.preprocess.image_size=256"))
    with pytest.raises(ConfigError, match="video_frames_per_clip: 4"):
        model_kwargs(tiny_cfg("model.preprocess.video_frames_per_clip=4"))


def test_huge_from_our_config_has_the_package_layout(huge_layout):
    ours = build_imagebind(model_kwargs(load_config().config.model), empty=True)
    layout = {k: (tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()}
    assert layout == huge_layout
    assert len(layout) == 1311  # ENVIRONMENT.md: the official checkpoint's key count and size
    assert sum(torch.Size(s).numel() for s, _ in layout.values()) == 1_200_786_990


def _zero_file(layout: dict, path, drop: str | None = None, extra: str | None = None, reshape=None):
    """A checkpoint with exactly ``layout``: zero-stride expanded zeros (a few hundred KB on disk)."""
    state = {k: torch.zeros((), dtype=dt).expand(shape) for k, (shape, dt) in layout.items() if k != drop}
    if extra:
        state[extra] = torch.zeros(3)
    if reshape:
        state[reshape] = torch.zeros(7)
    torch.save(state, path)
    return path


def test_loader_takes_the_huge_layout_and_names_bad_keys(huge_layout, tmp_path):
    good = _zero_file(huge_layout, tmp_path / "imagebind_huge.pth")
    assert good.stat().st_size < 2_000_000
    model = build_imagebind(huge_kwargs(), empty=True)
    load_imagebind_checkpoint(model, good)
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    w = params["modality_trunks.vision.blocks.31.attn.in_proj_weight"]
    assert w.shape == (3840, 1280) and not w.any()
    # the whole path from config/model.yaml, the checkpoint swapped for this file (nothing materialised)
    cfg = load_config(overrides=[f"model.encoder.checkpoint={good}"]).config.model
    enc = build_encoder(cfg, hash_memo=tmp_path / "memo.json")
    assert enc.out_dim == 1024 and enc.identity == f"imagebind-sha256-{sha256_file(good)}-float32"
    assert enc.outputs_per_input("video") == 1 and enc.input_shape("video") == (15, 3, 2, 224, 224)

    key = "modality_heads.audio.2.weight"
    cases = {
        "missing keys: " + key: dict(drop=key),
        "unexpected keys: extra.weight": dict(extra="extra.weight"),
        f"shape mismatches: {key} (file (7,), model (1024, 768))": dict(reshape=key),
    }
    for i, (message, kwargs) in enumerate(cases.items()):
        bad = _zero_file(huge_layout, tmp_path / f"bad{i}.pth", **kwargs)
        with pytest.raises(CheckpointError) as e:
            load_imagebind_checkpoint(build_imagebind(huge_kwargs(), empty=True), bad)
        assert str(bad) in str(e.value) and message in str(e.value), str(e.value)


def test_loader_refuses_pickled_objects_and_missing_files(tiny, tmp_path):
    state = dict(tiny.model.state_dict())
    state["note"] = Fraction(1, 3)  # an arbitrary Python object: weights_only refuses to unpickle it
    path = tmp_path / "pickled.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="pickled.pth: not loadable with torch.load.weights_only=True."):
        load_imagebind_checkpoint(tiny.model, path)
    with pytest.raises(FileNotFoundError, match="nope.pth: ImageBind checkpoint not found"):
        load_imagebind_checkpoint(tiny.model, tmp_path / "nope.pth")


def test_build_encoder_from_a_checkpoint_file(tiny, tmp_path):
    """A real tiny checkpoint round-trips through build_encoder and gives identical outputs; its
    identity is the file's sha256 (memoised by path, size and mtime)."""
    path = tmp_path / "tiny.pth"
    torch.save(tiny.model.state_dict(), path)
    memo = tmp_path / "memo.json"
    loaded = build_encoder(tiny_cfg(f"model.encoder.checkpoint={path}"), hash_memo=memo)
    assert loaded.identity == f"imagebind-sha256-{sha256_file(path)}-float32" != tiny.identity
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(loaded.encode("image", x), tiny.encode("image", x))


def test_checkpoint_hash_is_memoised_by_size_and_mtime(tmp_path):
    path, memo = tmp_path / "w.pth", tmp_path / "memo.json"
    path.write_bytes(b"a" * 1000)
    first = sha256_memoised(path, memo)
    assert first == sha256_file(path) and str(path.resolve()) in memo.read_text()
    st = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; restore the mtime: the memo answers without hashing
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_memoised(path, memo) == first
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    assert sha256_memoised(path, memo) == sha256_file(path) != first


# ----------------------------------------------------------------------------------------- frozen
def test_frozen_eval_no_grad(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    parent = nn.ModuleDict({"encoder": tiny, "proj": nn.Linear(tiny.out_dim, 8)})
    parent.train()
    assert parent["proj"].training
    assert not any(m.training for m in tiny.modules())
    with torch.enable_grad():
        feats = tiny.encode("audio", torch.randn(2, *tiny.input_shape("audio")))
        assert feats.grad_fn is None and not feats.requires_grad
        parent["proj"](feats).sum().backward()
    assert parent["proj"].weight.grad is not None
    assert all(p.grad is None for p in tiny.parameters())


def test_pooled_equals_the_package_forward(tiny):
    torch.manual_seed(0)
    for modality, key in [("image", "vision"), ("audio", "audio"), ("video", "vision")]:
        x = torch.randn(2, *tiny.input_shape(modality))
        ours = tiny.encode(modality, x)
        assert ours.shape == (2, 1, tiny.out_dim) and tiny.outputs_per_input(modality) == 1
        assert torch.allclose(ours[:, 0], tiny.model({key: x})[key], atol=1e-6)


def test_tokens_are_per_clip_and_average_to_pooled(tiny):
    tokens = build_encoder(tiny_cfg("model.encoder.output=tokens"))
    assert tokens.identity == tiny.identity  # same weights; the output mode is part of the cache key
    assert [tokens.outputs_per_input(m) for m in ("image", "audio", "video")] == [1, 3, 5]
    torch.manual_seed(1)
    for modality in ("image", "audio", "video"):
        x = torch.randn(2, *tiny.input_shape(modality))
        per_clip = tokens.encode(modality, x)
        assert per_clip.shape == (2, tokens.outputs_per_input(modality), tiny.out_dim)
        assert torch.allclose(per_clip.mean(1, keepdim=True), tiny.encode(modality, x), atol=1e-5)
    # each audio clip is a postprocessed ImageBind embedding (unit norm x the audio logit scale 20)
    audio = tokens.encode("audio", torch.randn(1, *tiny.input_shape("audio")))
    assert torch.allclose(audio.norm(dim=-1), torch.full((1, 3), 20.0), atol=1e-4)


def test_random_init_is_seeded_and_identified(tiny):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = build_encoder(tiny_cfg())
    assert torch.equal(torch.rand(3), before), "building the encoder must not move the global RNG"
    assert again.identity == tiny.identity
    same = zip(again.state_dict().values(), tiny.state_dict().values())
    assert all(torch.equal(a, b) for a, b in same)
    other = build_encoder(tiny_cfg("model.encoder.seed=1"))
    assert other.identity != tiny.identity
    w = "modality_trunks.vision.blocks.0.attn.in_proj_weight"
    assert not torch.equal(other.state_dict()[f"model.{w}"], tiny.state_dict()[f"model.{w}"])
    wider = build_encoder(tiny_cfg("model.encoder.dims.out_embed_dim=16"))
    assert wider.identity != tiny.identity and wider.out_dim == 16


def test_bad_inputs_are_named(tiny):
    with pytest.raises(
        ValueError, match=r"audio input: expected \[N, 3, 1, 128, 204\], got \[2, 1, 128, 204\]"
    ):
        tiny.encode("audio", torch.randn(2, 1, 128, 204))
    with pytest.raises(ValueError, match="unknown modality 'thermal'"):
        tiny.outputs_per_input("thermal")
