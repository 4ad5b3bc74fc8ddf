"""Media -> encoder inputs: numerically equal to imagebind.data's own loaders, clear errors on bad files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from _media import frame, write_image, write_mp4, write_wav
from toollmm.core import compat
from toollmm.core.config import PreprocessConfig
from toollmm.data.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    MediaError,
    load_audio,
    load_image,
    load_media,
    load_video,
    settings,
)

CFG = PreprocessConfig()


@pytest.fixture(scope="module")
def ib_data():
    compat.import_imagebind()
    import imagebind.data

    return imagebind.data


@pytest.mark.parametrize("size,suffix", [((300, 200), ".png"), ((150, 260), ".jpg"), ((224, 224), ".png")])
def test_image_equals_imagebind(ib_data, tmp_path, size, suffix):
    path = write_image(tmp_path / f"x{suffix}", *size)
    ours = load_image(path, CFG)
    ref = ib_data.load_and_transform_vision_data([str(path)], "cpu")[0]
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, ref)


def _soundfile_load(path, *args, **kwargs):
    """torchaudio.load's reading step (float32 in [-1, 1], [channels, samples]) without FFmpeg."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), rate


@pytest.mark.parametrize(
    "seconds,rate,channels",
    [(5.0, 16000, 1), (9.3, 16000, 1), (3.0, 44100, 1), (1.0, 22050, 2), (2.0, 8000, 1)],
)
def test_audio_equals_imagebind(ib_data, tmp_path, monkeypatch, seconds, rate, channels):
    # imagebind.data reads with torchaudio.load, which needs torchcodec + FFmpeg in torchaudio >= 2.9;
    # only that reading step is replaced (by soundfile); resampling, clip sampling, fbank and
    # normalisation are the package's own code.
    monkeypatch.setattr(ib_data.torchaudio, "load", _soundfile_load)
    path = write_wav(tmp_path / "a.wav", seconds, rate, channels)
    ours = load_audio(path, CFG)
    ref = ib_data.load_and_transform_audio_data([str(path)], "cpu")[0]
    assert ours.shape == (3, 1, 128, 204)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("width,height,frames,fps", [(160, 120, 35, 10), (96, 128, 23, 8), (64, 64, 70, 25)])
def test_video_equals_imagebind(ib_data, tmp_path, monkeypatch, width, height, frames, fps):
    # imagebind.data passes `sample_rate` to EncodedVideo.from_path, which pytorchvideo 0.1.5 rejects
    # (ImageBind #102); only that keyword is dropped, the package's decord path does the rest.
    real = ib_data.EncodedVideo.from_path.__func__

    def from_path(cls, path, sample_rate=None, **kwargs):
        return real(cls, path, **kwargs)

    monkeypatch.setattr(ib_data.EncodedVideo, "from_path", classmethod(from_path))
    path = write_mp4(tmp_path / "v.mp4", frames, fps, width, height)
    ours = load_video(path, CFG)
    assert ours.shape == (15, 3, 2, 224, 224)
    assert torch.equal(ours, load_video(path, CFG)), "not deterministic"
    ref = ib_data.load_and_transform_video_data([str(path)], "cpu")[0]
    assert torch.equal(ours, ref)


def _colour_of(x: torch.Tensor) -> np.ndarray:
    """Undo CLIP normalisation of a [3, T, H, W] clip -> each frame's centre red value (0..255)."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1)
    std = torch.tensor(CLIP_STD).view(3, 1)
    centre = x[:, :, x.shape[2] // 2, x.shape[3] // 2]
    return ((centre * std + mean) * 255).round()[0].numpy()


def test_frame_list_video_samples_imagebind_clips(tmp_path):
    paths = []
    for i in range(12):  # solid frames whose red value encodes the index
        paths.append(tmp_path / f"f{i:02d}.png")
        Image.fromarray(np.full((48, 64, 3), (i * 20, 60, 90), np.uint8)).save(paths[-1])
    out = load_video(paths, CFG)
    assert out.shape == (15, 3, 2, 224, 224)
    assert torch.equal(out, load_video([str(p) for p in paths], CFG))
    # read as 12 s at 1 fps: clips start every (12 - 2) / 5 = 2 s and take their 2 s (2 frames)
    picked = [_colour_of(out[k * 3 + 1]) / 20 for k in range(5)]
    assert [list(p) for p in picked] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # the three crops of a clip come from one frame pair (solid frames: identical crops)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert load_video(paths[:1], CFG).shape == (15, 3, 2, 224, 224)  # one frame is still a video


def test_frame_list_matches_the_decoded_video_path(tmp_path):
    """A frame list and an MP4 of the same frames go through the same clip logic: with lossless
    PNG frames at fps = video_frame_list_fps the sampled frames are the MP4's up to compression."""
    cfg = dataclasses.replace(CFG, video_frame_list_fps=10.0)
    paths = []
    for i in range(35):
        paths.append(tmp_path / f"f{i:02d}.png")
        Image.fromarray(frame(i, 160, 120)).save(paths[-1])
    from_list = load_video(paths, cfg)
    from_mp4 = load_video(write_mp4(tmp_path / "v.mp4", 35, 10, 160, 120), cfg)
    assert from_list.shape == from_mp4.shape
    assert (from_list - from_mp4).abs().mean() < 0.05  # H.264 loss only; a wrong frame differs by ~1


def test_bytes_sources_equal_paths(tmp_path):
    image = write_image(tmp_path / "i.png")
    audio = write_wav(tmp_path / "a.wav")
    video = write_mp4(tmp_path / "v.mp4")
    for modality, path in [("image", image), ("audio", audio), ("video", video)]:
        assert torch.equal(load_media(modality, path.read_bytes(), CFG), load_media(modality, path, CFG))


def test_configurable_settings(tmp_path):
    cfg = dataclasses.replace(
        CFG, audio_clips=2, audio_target_length=100, video_clips=3, video_spatial_crops=1
    )
    assert load_audio(write_wav(tmp_path / "a.wav"), cfg).shape == (2, 1, 128, 100)
    video = load_video(write_mp4(tmp_path / "v.mp4"), cfg)
    assert video.shape == (3, 3, 2, 224, 224)
    assert torch.equal(video[0], load_video(tmp_path / "v.mp4", CFG)[1]), "centre crop of clip 0"
    assert settings("image", cfg) == settings("image", CFG)
    assert settings("audio", cfg) != settings("audio", CFG)
    assert settings("video", cfg) != settings("video", CFG)


@pytest.mark.parametrize("modality,suffix", [("image", ".png"), ("audio", ".wav"), ("video", ".mp4")])
def test_missing_and_corrupt_files_name_the_file(tmp_path, modality, suffix):
    missing = tmp_path / f"nope{suffix}"
    with pytest.raises(MediaError, match=f"{missing}: file not found"):
        load_media(modality, missing, CFG)
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(MediaError, match=f"{corrupt}: not a readable"):
        load_media(modality, corrupt, CFG)
    with pytest.raises(MediaError, match="record-7: not a readable"):
        load_media(modality, corrupt.read_bytes(), CFG, name="record-7")


def test_truncated_and_degenerate_inputs(tmp_path):
    png = write_image(tmp_path / "i.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    with pytest.raises(MediaError, match="cut.png: not a readable image"):
        load_image(cut, CFG)
    short = write_wav(tmp_path / "short.wav", seconds=0.01)
    with pytest.raises(MediaError, match="short.wav: audio too short"):
        load_audio(short, CFG)
    frames = [write_image(tmp_path / f"f{i}.png", 64, 48, seed=i) for i in range(4)]
    with pytest.raises(MediaError, match="empty frame list"):
        load_video([], CFG)
    with pytest.raises(MediaError, match=f"{tmp_path / 'gone.png'}: file not found"):
        load_video([*frames[:2], tmp_path / "gone.png"], CFG)
    odd = write_image(tmp_path / "odd.png", 80, 48)
    with pytest.raises(MediaError, match="odd.png: frame size"):
        load_video([*frames[:1], odd], CFG)
    with pytest.raises(ValueError, match="unknown modality 'depth'"):
        load_media("depth", png, CFG)
