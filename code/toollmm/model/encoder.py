"""The frozen ImageBind encoder: the ``imagebind`` package's real ``ImageBindModel``, never a copy.

``build_encoder(model_cfg)`` builds it from ``model.encoder`` (+ the model-shaping ``model.preprocess``
values), loads the official checkpoint strictly (``torch.load(weights_only=True)``, every missing,
unexpected or mis-shaped key named) or initialises it from ``encoder.seed``, and freezes it: no
parameter requires grad, it stays in eval mode whatever ``.train()`` its parent calls, and outputs
carry no autograd graph. Preset ``huge`` must match the package's ``imagebind_huge()`` exactly.

Outputs per input (``encode``): ``pooled`` = ImageBind's own embedding (each clip normalised and
scaled by the modality's postprocessor, then clips averaged; identical to ``ImageBindModel.forward``);
``tokens`` = one embedding per clip (audio: ``audio_clips``; video: ``video_clips``, each the mean of
its spatial crops; image: 1). The package always builds six towers; only vision and audio run here.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from toollmm.core import compat
from toollmm.core.config import ModelConfig, PreprocessConfig
from toollmm.core.configlib import ConfigError
from toollmm.core.errors import UserError
from toollmm.core.files import sha256_memoised
from toollmm.core.paths import CACHE_DIR, resolve

log = logging.getLogger(__name__)

TOWER = {"image": "vision", "video": "vision", "audio": "audio"}
HASH_MEMO = CACHE_DIR / "checkpoint_sha256.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model; the message names the file and every bad key."""


def _imagebind_model_module():
    compat.import_imagebind()
    from imagebind.models import imagebind_model

    return imagebind_model


@functools.cache
def huge_kwargs() -> dict:
    """Every ``ImageBindModel`` keyword that ``imagebind_huge()`` uses (its explicit arguments over the
    class defaults), read from the installed package by intercepting its constructor call."""
    mod = _imagebind_model_module()
    real = mod.ImageBindModel
    seen: dict = {}

    class _Captured(Exception):
        pass

    def capture(**kwargs):
        seen.update(kwargs)
        raise _Captured

    mod.ImageBindModel = capture
    try:
        mod.imagebind_huge(pretrained=False)
    except _Captured:
        pass
    finally:
        mod.ImageBindModel = real
    defaults = {p.name: p.default for p in inspect.signature(real).parameters.values()}
    return defaults | seen


def model_kwargs(model_cfg: ModelConfig) -> dict:
    """``ImageBindModel`` keywords from our config; raise ConfigError listing every inconsistency."""
    enc, pre = model_cfg.encoder, model_cfg.preprocess
    kwargs = dict(vars(enc.dims))
    kwargs.update(audio_num_mel_bins=pre.audio_mel_bins, audio_target_len=pre.audio_target_length)
    defaults = inspect.signature(_imagebind_model_module().ImageBindModel).parameters
    problems = []
    if pre.image_size != 224:
        problems.append(
            f"model.preprocess.image_size: {pre.image_size}; ImageBind's vision tower is fixed at 224"
        )
    if pre.video_frames_per_clip != defaults["video_frames"].default:
        problems.append(
            f"model.preprocess.video_frames_per_clip: {pre.video_frames_per_clip}; ImageBind's temporal "
            f"patch takes {defaults['video_frames'].default} frames"
        )
    if enc.preset == "huge":
        huge = huge_kwargs()
        problems += [
            f"model.encoder (preset huge): {k}={v} but imagebind_huge uses {huge[k]}"
            for k, v in kwargs.items()
            if huge[k] != v
        ]
    if problems:
        raise ConfigError(problems)
    return kwargs


def build_imagebind(kwargs: dict, empty: bool = False) -> nn.Module:
    """``ImageBindModel(**kwargs)``; ``empty`` puts parameters on the meta device (no memory, no init).
    (``with torch.device("meta")`` fails inside the package: it calls ``.item()`` on a linspace.)"""
    cls = _imagebind_model_module().ImageBindModel
    if not empty:
        return cls(**kwargs)
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------- loading
def _describe(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the file and every missing, unexpected and mis-shaped key."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {want[k]})"
        for k in set(want) & set(state)
        if tuple(state[k].shape) != want[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_describe(shapes)}")
    if problems:
        raise CheckpointError(f"{path}: does not fit this ImageBindModel: " + "; ".join(problems))


def load_imagebind_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an ImageBind state dict strictly. A model on the meta device takes the file's tensors
    directly (``assign``; memory-mapped when the file is in torch's zip format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: ImageBind checkpoint not found (see pretrained_checkpoint/README.md)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # unpickling refusals and corrupt archives have no common type
        raise CheckpointError(f"{path}: not loadable with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
    check_state_dict(model, state, path)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
    log.info("loaded ImageBind weights from %s (%d tensors)", path, len(state))


def _scalars_to_buffers(model: nn.Module) -> None:
    """0-dim parameters (the text tower's learnable logit scale) become buffers of the same name: the
    state dict is unchanged, and a frozen encoder inside a DeepSpeed engine no longer breaks its start-up
    broadcast (which views every parameter as bytes; a 0-dim tensor cannot be)."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0:
                del mod._parameters[name]
                mod.register_buffer(name, p.detach())


# ---------------------------------------------------------------------------------------- encoder
class ImageBindEncoder(nn.Module):
    """Frozen ImageBind: ``encode(modality, pixels) -> [N, outputs_per_input(modality), out_dim]``."""

    def __init__(self, model: nn.Module, *, output: str, preprocess: PreprocessConfig, identity: str):
        super().__init__()
        self.model = model
        self.output = output
        self.preprocess = preprocess
        self.identity = identity
        self.out_dim = int(model.modality_heads["vision"][-1].out_features)
        _scalars_to_buffers(model)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ImageBindEncoder:
        """Always eval: a parent's ``.train()`` must not switch on the audio tower's drop-path."""
        return super().train(False)

    def outputs_per_input(self, modality: str) -> int:
        self._check_modality(modality)
        if self.output == "pooled" or modality == "image":
            return 1
        return self.preprocess.audio_clips if modality == "audio" else self.preprocess.video_clips

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """One input's preprocessed shape (``toollmm.data.preprocess``)."""
        p = self.preprocess
        self._check_modality(modality)
        s = p.image_size
        if modality == "image":
            return (3, s, s)
        if modality == "audio":
            return (p.audio_clips, 1, p.audio_mel_bins, p.audio_target_length)
        return (p.video_clips * p.video_spatial_crops, 3, p.video_frames_per_clip, s, s)

    @torch.no_grad()
    def encode(self, modality: str, pixels: torch.Tensor) -> torch.Tensor:
        want = self.input_shape(modality)
        if tuple(pixels.shape[1:]) != want or pixels.ndim != len(want) + 1:
            raise ValueError(
                f"{modality} input: expected [N, {', '.join(map(str, want))}], got {list(pixels.shape)}"
            )
        n = pixels.shape[0]
        per_input = 1 if modality == "image" else want[0]
        param = next(self.model.parameters())
        x = pixels if modality == "image" else pixels.flatten(0, 1)  # clips (x crops) become the batch
        emb = self._tower(TOWER[modality], x.to(param.device, param.dtype)).float()
        emb = emb.reshape(n, per_input, -1)
        if self.output == "pooled":
            return emb.mean(dim=1, keepdim=True)
        if modality == "video":
            emb = emb.reshape(n, self.preprocess.video_clips, self.preprocess.video_spatial_crops, -1).mean(2)
        return emb

    forward = encode

    def _tower(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """ImageBindModel.forward for one modality, without its clip averaging."""
        m = self.model
        out = m.modality_preprocessors[key](**{key: x})
        y = m.modality_trunks[key](**out["trunk"])
        y = m.modality_heads[key](y, **out["head"])
        return m.modality_postprocessors[key](y)

    @staticmethod
    def _check_modality(modality: str) -> None:
        if modality not in TOWER:
            raise ValueError(f"unknown modality {modality!r} (known: {', '.join(TOWER)})")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagebind-unofficial")
    except PackageNotFoundError:
        return "unknown"


def random_identity(kwargs: dict, seed: int) -> str:
    blob = {"kwargs": kwargs, "seed": seed, "imagebind": _package_version(), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def encoder_identity(
    model_cfg: ModelConfig, dtype: torch.dtype = torch.float32, hash_memo: str | os.PathLike = HASH_MEMO
) -> str:
    """The identity ``build_encoder(model_cfg, dtype=dtype)`` gives its encoder, without building it
    (the checkpoint's sha256, memoised; or the random-init kwargs + seed), so a run can look its
    features up in the cache and never load the weights when they are all there."""
    enc = model_cfg.encoder
    kwargs = model_kwargs(model_cfg)
    ckpt = resolve(enc.checkpoint)
    if ckpt is None:
        ident = f"imagebind-random-{random_identity(kwargs, enc.seed)[:32]}"
    else:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(
                f"{ckpt}: ImageBind checkpoint not found (see pretrained_checkpoint/README.md)"
            )
        ident = f"imagebind-sha256-{sha256_memoised(ckpt, hash_memo)}"
    return f"{ident}-{str(dtype).removeprefix('torch.')}"


def build_encoder(
    model_cfg: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hash_memo: str | os.PathLike = HASH_MEMO,
) -> ImageBindEncoder:
    """The frozen encoder described by ``model_cfg.encoder`` (see the module docstring)."""
    enc = model_cfg.encoder
    kwargs = model_kwargs(model_cfg)
    ckpt = resolve(enc.checkpoint)
    if ckpt is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(enc.seed)
            model = build_imagebind(kwargs)
        log.info("ImageBind (%s) randomly initialised from seed %d", enc.preset, enc.seed)
    else:
        model = build_imagebind(kwargs, empty=True)
        load_imagebind_checkpoint(model, ckpt)
    model.to(device=device, dtype=dtype)
    identity = encoder_identity(model_cfg, dtype, hash_memo)
    return ImageBindEncoder(model, output=enc.output, preprocess=model_cfg.preprocess, identity=identity)
