"""Writers of small, deterministic media files for tests (PIL, soundfile, PyAV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_image(path: Path, width: int = 300, height: int = 200, seed: int = 0) -> Path:
    from PIL import Image

    rs = np.random.RandomState(seed)
    Image.fromarray(rs.randint(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_wav(path: Path, seconds: float = 3.0, rate: int = 16000, channels: int = 1, seed: int = 0) -> Path:
    import soundfile as sf

    rs = np.random.RandomState(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * seed) * t)[:, None]
    wave = tone + 0.05 * rs.randn(len(t), channels) + 0.02
    sf.write(path, wave.astype(np.float32), rate, subtype="PCM_16")
    return path


def frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame i of a moving bar whose top band encodes i."""
    a = np.zeros((height, width, 3), np.uint8)
    x = (i * 4) % width
    a[:, x : x + 20] = [255, 50 * (i % 5), 0]
    a[: height // 3] = [(i * 5) % 256, 100, 200]
    return a


def write_mp4(path: Path, frames: int = 35, fps: int = 10, width: int = 160, height: int = 120) -> Path:
    import av

    with av.open(str(path), "w") as box:
        stream = box.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i, width, height), format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return path
