"""Media files -> ImageBind encoder inputs, with ImageBind's own defaults (``PreprocessConfig``).

Shapes per input (batch them with ``torch.stack``; see ``toollmm.core.batch.MediaInputs``):

* image ``[3, S, S]``: bicubic resize of the short side to S, centre crop, CLIP normalisation
  (``imagebind.data.load_and_transform_vision_data``).
* audio ``[clips, 1, mel_bins, target_length]``: soundfile read, resample to ``audio_sample_rate``,
  ``audio_clips`` clips of ``audio_clip_duration`` s spread evenly (pytorchvideo's
  ``ConstantClipsPerVideoSampler``), kaldi fbank per clip (first channel, after removing the clip's
  mean, as ImageBind does), padded / cut to ``target_length`` frames, ``(x - mean) / std``.
* video ``[clips * crops, 3, frames, S, S]``: PyAV decoding; clip k takes the frames with index in
  ``[ceil(fps * start_k), ceil(fps * end_k))`` (pytorchvideo's decord reader), ``frames`` of them
  evenly spaced; short side bilinear-scaled to S, CLIP normalisation, left/centre/right crops (or
  top/centre/bottom for portrait frames; only the centre crop when ``video_spatial_crops`` is 1).
  A video may also be a list of frame images (LaViA): it is read as a clip sampled at
  ``video_frame_list_fps`` and goes through the same clip logic.

Sources are paths or raw bytes (webdataset shards). Any unreadable input raises ``MediaError`` naming it.
``torchaudio.load`` is not used: in torchaudio >= 2.9 it needs torchcodec and FFmpeg libraries.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from toollmm.core.config import PreprocessConfig
from toollmm.core.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FBANK_FRAME_SHIFT_MS = 10
FBANK_FRAME_LENGTH_MS = 25

Source = str | os.PathLike | bytes
VideoSource = Source | Sequence[str | os.PathLike]


class MediaError(UserError, ValueError):
    """A media input that cannot be read or preprocessed; names the input and the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"{name}: {reason}")


def source_name(src: VideoSource, name: str | None = None) -> str:
    if name:
        return name
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    if isinstance(src, (list, tuple)):
        return f"<{len(src)} frames from {os.fspath(src[0]) if src else '?'}>"
    return os.fspath(src)


def _open(src: Source, name: str) -> io.BytesIO | str:
    """A file-like object for bytes, the path (checked to exist) otherwise."""
    if isinstance(src, bytes):
        return io.BytesIO(src)
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise MediaError(name, "file not found")
    return path


def settings(modality: str, cfg: PreprocessConfig) -> dict:
    """The preprocessing settings that shape ``modality``'s tensors (part of the feature-cache key)."""
    fields = {
        "image": ("image_size",),
        "audio": tuple(k for k in vars(cfg) if k.startswith("audio_")),
        "video": ("image_size",) + tuple(k for k in vars(cfg) if k.startswith("video_")),
    }
    if modality not in fields:
        raise ValueError(f"unknown modality {modality!r} (known: image, video, audio)")
    return {k: getattr(cfg, k) for k in sorted(fields[modality])}


# ------------------------------------------------------------------------------------------- image
def _read_rgb(src: Source, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_open(src, name)) as im:
            return im.convert("RGB")  # forces a full decode: truncated files fail here
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(name, f"not a readable image ({e})") from e


def load_image(src: Source, cfg: PreprocessConfig, name: str | None = None) -> torch.Tensor:
    from torchvision import transforms

    name = source_name(src, name)
    tf = transforms.Compose(
        [
            transforms.Resize(cfg.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(cfg.image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ]
    )
    return tf(_read_rgb(src, name))


# ------------------------------------------------------------------------------------------- clips
def clip_windows(duration: float, clip_duration: float, clips: int) -> list[tuple[Fraction, Fraction]]:
    """ImageBind's clip times: ``clips`` windows of ``clip_duration`` s, starts evenly spaced over
    ``[0, duration - clip_duration]`` with step ``(duration - clip_duration) / clips`` (exact fractions,
    like pytorchvideo's ConstantClipsPerVideoSampler)."""
    length = Fraction(clip_duration)
    step = Fraction(max(duration - length, 0)) / clips
    return [(step * k, step * k + length) for k in range(clips)]


# ------------------------------------------------------------------------------------------- audio
def fbank(clip: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """``[channels, samples]`` -> normalised ``[1, mel_bins, target_length]`` (ImageBind's recipe:
    kaldi fbank of the first channel, padded with zeros or cut, then ``(x - mean) / std``).

    The clip is centred IN PLACE, as ``imagebind.data.waveform2melspec`` does on a view of the whole
    waveform: overlapping clips (files shorter than ``clips * clip_duration``) see the earlier clips'
    shifts. We keep that quirk so features equal ImageBind's (and the anchors' checkpoints' inputs)."""
    import torchaudio

    clip -= clip.mean()
    fb = torchaudio.compliance.kaldi.fbank(
        clip,
        htk_compat=True,
        sample_frequency=cfg.audio_sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=cfg.audio_mel_bins,
        dither=0.0,
        frame_length=FBANK_FRAME_LENGTH_MS,
        frame_shift=FBANK_FRAME_SHIFT_MS,
    ).t()
    pad = cfg.audio_target_length - fb.shape[1]
    fb = F.pad(fb, (0, pad)) if pad > 0 else fb[:, : cfg.audio_target_length]
    return ((fb - cfg.audio_mean) / cfg.audio_std).unsqueeze(0)


def read_audio(src: Source, name: str | None = None) -> tuple[torch.Tensor, int]:
    """``([channels, samples] float32 in [-1, 1], sample_rate)`` via soundfile."""
    import soundfile as sf

    name = source_name(src, name)
    try:
        data, sr = sf.read(_open(src, name), dtype="float32", always_2d=True)
    except MediaError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise MediaError(name, f"not a readable audio file ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def load_audio(src: Source, cfg: PreprocessConfig, name: str | None = None) -> torch.Tensor:
    import torchaudio

    name = source_name(src, name)
    wave, sr = read_audio(src, name)
    if sr != cfg.audio_sample_rate:
        wave = torchaudio.functional.resample(wave, orig_freq=sr, new_freq=cfg.audio_sample_rate)
    rate = cfg.audio_sample_rate
    min_samples = rate * FBANK_FRAME_LENGTH_MS // 1000
    if wave.shape[1] < min_samples:
        raise MediaError(name, f"audio too short ({wave.shape[1]} samples at {rate} Hz; need {min_samples})")
    if not torch.isfinite(wave).all():
        raise MediaError(name, "audio contains NaN or infinite samples")
    clips = []
    for start, end in clip_windows(wave.shape[1] / rate, cfg.audio_clip_duration, cfg.audio_clips):
        clips.append(fbank(wave[:, int(start * rate) : int(end * rate)], cfg))  # a view: see fbank()
    return torch.stack(clips)


# ------------------------------------------------------------------------------------------- video
def clip_frame_indices(num_frames: int, fps: float, cfg: PreprocessConfig) -> list[list[int]]:
    """Frame indices per clip: the frames of ``[ceil(fps*start), ceil(fps*end))`` (capped at the
    video's end), then ``video_frames_per_clip`` of them evenly spaced (pytorchvideo's
    UniformTemporalSubsample; repeats when the clip has fewer frames)."""
    out = []
    for start, end in clip_windows(num_frames / fps, cfg.video_clip_duration, cfg.video_clips):
        lo = min(math.ceil(fps * start), num_frames - 1)
        hi = max(min(math.ceil(fps * end), num_frames), lo + 1)
        picks = torch.linspace(0, hi - lo - 1, cfg.video_frames_per_clip).clamp(0, hi - lo - 1).long()
        out.append([lo + int(i) for i in picks])
    return out


def _decode_frames(src: Source, name: str, cfg: PreprocessConfig) -> list[list[np.ndarray]]:
    """RGB frames per clip, decoded with PyAV (only the frames the clips use are converted)."""
    import av

    try:
        with av.open(_open(src, name)) as box:
            if not box.streams.video:
                raise MediaError(name, "no video stream")
            stream = box.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            num = stream.frames or sum(1 for p in box.demux(stream) if p.size)
            if not rate or num <= 0:
                raise MediaError(name, "video has no frames or no frame rate")
            box.seek(0)
            per_clip = clip_frame_indices(num, float(rate), cfg)
            wanted = {i for clip in per_clip for i in clip}
            frames: dict[int, np.ndarray] = {}
            for i, frame in enumerate(box.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= max(wanted):
                    break
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(name, f"not a readable video ({e})") from e
    if not frames:
        raise MediaError(name, "no decodable video frames")
    last = frames[max(frames)]  # containers may overstate their frame count: reuse the last frame
    return [[frames.get(i, last) for i in clip] for clip in per_clip]


def _frames_from_list(paths: Sequence, name: str, cfg: PreprocessConfig) -> list[list[np.ndarray]]:
    if not paths:
        raise MediaError(name, "empty frame list")
    per_clip = clip_frame_indices(len(paths), cfg.video_frame_list_fps, cfg)
    frames: dict[int, np.ndarray] = {}
    for i in sorted({i for clip in per_clip for i in clip}):
        frames[i] = np.asarray(_read_rgb(paths[i], os.fspath(paths[i])))
        first = next(iter(frames.values()))
        if frames[i].shape != first.shape:
            raise MediaError(
                os.fspath(paths[i]), f"frame size {frames[i].shape[:2]} differs from {first.shape[:2]}"
            )
    return [[frames[i] for i in clip] for clip in per_clip]


def _crop_offsets(h: int, w: int, size: int, crops: int) -> list[tuple[int, int]]:
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if crops == 1:
        return [(y, x)]
    if h > w:
        return [(0, x), (y, x), (h - size, x)]
    return [(y, 0), (y, x), (y, w - size)]


def load_video(src: VideoSource, cfg: PreprocessConfig, name: str | None = None) -> torch.Tensor:
    name = source_name(src, name)
    if cfg.video_spatial_crops not in (1, 3):
        raise ValueError(f"preprocess.video_spatial_crops must be 1 or 3, got {cfg.video_spatial_crops}")
    if isinstance(src, (list, tuple)):
        clips = _frames_from_list(src, name, cfg)
    else:
        clips = _decode_frames(src, name, cfg)
    size = cfg.image_size
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    out = []
    for frames in clips:  # ImageBind's order: scale to [0, 1], short side to S, normalise, crop
        x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255.0
        _, _, h, w = x.shape
        new_h, new_w = (int(h / w * size), size) if w < h else (size, int(w / h * size))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        x = (x - mean) / std
        for y0, x0 in _crop_offsets(new_h, new_w, size, cfg.video_spatial_crops):
            out.append(x[:, :, y0 : y0 + size, x0 : x0 + size])
    return torch.stack(out)


def load_media(
    modality: str, src: VideoSource, cfg: PreprocessConfig, name: str | None = None
) -> torch.Tensor:
    """Dispatch on modality; returns one input's tensor (see the module docstring for shapes)."""
    if modality == "image":
        return load_image(src, cfg, name)
    if modality == "audio":
        return load_audio(src, cfg, name)
    if modality == "video":
        return load_video(src, cfg, name)
    raise ValueError(f"unknown modality {modality!r} (known: image, video, audio)")
