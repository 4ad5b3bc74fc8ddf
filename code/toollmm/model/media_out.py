"""Write generated media: PNG (Pillow), MP4 (PyAV, which bundles FFmpeg) and WAV (soundfile).

Every writer goes through a temporary file in the target folder and an atomic rename, so a reader never
sees a half-written file and a crash leaves no truncated output under the final name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

SUFFIX = {"image": ".png", "video": ".mp4", "audio": ".wav"}


def output_path(path: str | os.PathLike, modality: str) -> Path:
    """``path`` with the modality's suffix added when it has none; a different suffix is an error."""
    p = Path(path)
    want = SUFFIX[modality]
    if not p.suffix:
        return p.with_suffix(want)
    if p.suffix.lower() != want:
        raise ValueError(f"{p}: a generated {modality} is written as {want}, not {p.suffix}")
    return p


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}"  # same folder: rename is atomic
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (diffusers' ``output_type="np"``) to uint8 pixels."""
    return (np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """``image``: H x W x 3 floats in [0, 1]."""
    from PIL import Image

    arr = to_uint8(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: expected an H x W x 3 image, got shape {arr.shape}")
    return _atomic(Path(path), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 8) -> Path:
    """``frames``: F x H x W x 3 floats in [0, 1]; H.264 (yuv420p) needs even sizes, so odd ones are padded."""
    import av

    arr = to_uint8(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"{path}: expected F x H x W x 3 frames, got shape {arr.shape}")
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(int(fps)))
            stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
            for frame in arr:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))

    return _atomic(Path(path), write)


def write_wav(audio: np.ndarray, path: str | os.PathLike, sample_rate: int) -> Path:
    """``audio``: mono samples (floats, nominally in [-1, 1]); written as 16-bit PCM."""
    import soundfile as sf

    arr = np.asarray(audio, dtype=np.float32).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{path}: no audio samples to write")
    return _atomic(
        Path(path),
        lambda tmp: sf.write(
            str(tmp), np.clip(arr, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format="WAV"
        ),
    )
