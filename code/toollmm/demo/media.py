"""Media renderers of the demo corpus: coloured shapes (PNG), tones (WAV), moving shapes (MP4).

Each renderer takes a dict of attribute values (see ``ATTRIBUTES``) and a numpy ``Generator`` that
only adds nuisance variation (jitter of position, size, hue, pitch, phase, noise), so two renders of
the same attributes differ (new renders for the held-out split) while the attributes stay visible.
Every file is written deterministically: same attributes + same generator state -> same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

IMAGE_SIZE = 224  # ImageBind's input size: no resize needed
VIDEO_SIZE = 64  # upscaled to 224 by the preprocessing (short-side scale)
VIDEO_FPS = 8
VIDEO_SECONDS = 2.0  # = one ImageBind video clip
AUDIO_RATE = 16000
AUDIO_SECONDS = 3.0  # ImageBind takes 3 clips of 2 s: they overlap on a 3 s tone

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (145, 50, 195),
    "white": (235, 235, 235),
}
BACKGROUND = (15, 15, 15)
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_RADIUS = 0.36  # half-extent as a fraction of the frame: large shapes make the outline visible
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PITCHES = {"low": 250.0, "middle": 700.0, "high": 2000.0}  # Hz, band centres (+-10 % jitter)
PULSES = {"steady": 0.0, "slow": 2.0, "fast": 6.0}  # on/off pulses per second (0 = continuous)
AMPLITUDE = 0.6

#: the attributes of each modality and their value sets, in caption order. Chosen with the probe
#: (``toollmm.demo.probe``): a frozen random tiny ImageBind separates each of them linearly.
ATTRIBUTES = {
    "image": {"colour": tuple(COLOURS), "shape": SHAPES},
    "audio": {"pitch": tuple(PITCHES), "pulse": tuple(PULSES)},
    "video": {"colour": tuple(COLOURS), "direction": tuple(DIRECTIONS)},
}


def _jitter_colour(rgb, rng: np.random.Generator, amount: int = 14) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "cross":
        t = r * 0.35
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    poly = _polygon(shape, cx, cy, r)
    if poly is None:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    draw.polygon(poly, fill=fill)


def _get(attrs: dict, modality: str, name: str):
    if name not in attrs:
        raise KeyError(f"{modality} render: attribute {name!r} missing from {attrs}")
    if attrs[name] not in ATTRIBUTES[modality][name]:
        raise ValueError(f"{modality} attribute {name}={attrs[name]!r} not in {ATTRIBUTES[modality][name]}")
    return attrs[name]


def render_image(attrs: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One large centred shape on a dark background; jittered position, size and colour."""
    img = Image.new("RGB", (size, size), _jitter_colour(BACKGROUND, rng, 6))
    r = SHAPE_RADIUS * size * rng.uniform(0.95, 1.05)
    cx, cy = (0.5 + rng.uniform(-0.03, 0.03, size=2)) * size
    fill = _jitter_colour(COLOURS[_get(attrs, "image", "colour")], rng)
    draw_shape(ImageDraw.Draw(img), _get(attrs, "image", "shape"), float(cx), float(cy), r, fill)
    return img


def save_image(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False, compress_level=6)


def render_tone(attrs: dict, rng: np.random.Generator) -> np.ndarray:
    """A mono float32 sine tone at ``AUDIO_RATE`` in a pitch band, steady or pulsing."""
    n = int(AUDIO_SECONDS * AUDIO_RATE)
    t = np.arange(n, dtype=np.float64) / AUDIO_RATE
    freq = PITCHES[_get(attrs, "audio", "pitch")] * rng.uniform(0.9, 1.1)
    wave = np.sin(2 * math.pi * (freq * t + rng.uniform(0, 1)))
    rate = PULSES[_get(attrs, "audio", "pulse")] * rng.uniform(0.95, 1.05)
    if rate > 0:
        envelope = ((t * rate + rng.uniform(0, 1)) % 1.0 < 0.5).astype(np.float64)
        ramp = int(0.005 * AUDIO_RATE)  # 5 ms ramps so pulses do not click
        envelope = np.convolve(envelope, np.ones(ramp) / ramp, mode="same")
    else:
        envelope = np.ones(n)
    amp = AMPLITUDE * rng.uniform(0.9, 1.1)
    return (amp * wave * envelope + rng.normal(0.0, 0.003, n)).astype(np.float32)


def save_wav(samples: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, AUDIO_RATE, subtype="PCM_16", format="WAV")


def render_video_frames(attrs: dict, rng: np.random.Generator) -> list[np.ndarray]:
    """RGB uint8 frames of a circle crossing the frame in a direction."""
    size = VIDEO_SIZE
    n = int(VIDEO_SECONDS * VIDEO_FPS)
    dx, dy = DIRECTIONS[_get(attrs, "video", "direction")]
    fill = _jitter_colour(COLOURS[_get(attrs, "video", "colour")], rng)
    r = size * 0.18 * rng.uniform(0.9, 1.1)
    travel = size * rng.uniform(0.6, 0.7)
    cross = rng.uniform(-0.12, 0.12) * size  # jitter across the motion
    cx0 = size / 2 - dx * travel / 2 + (cross if dx == 0 else 0)
    cy0 = size / 2 - dy * travel / 2 + (cross if dy == 0 else 0)
    frames = []
    for i in range(n):
        f = i / (n - 1)
        img = Image.new("RGB", (size, size), BACKGROUND)
        draw_shape(ImageDraw.Draw(img), "circle", cx0 + dx * travel * f, cy0 + dy * travel * f, r, fill)
        frames.append(np.asarray(img))
    return frames


def save_mp4(frames: list[np.ndarray], path: Path, fps: int = VIDEO_FPS) -> None:
    """H.264 MP4 through PyAV (bundled FFmpeg) at a constant quantiser, one thread.

    x264's CRF rate control (macroblock-tree) wrote different bytes for the same frames in about 1 run
    in 30 here, even single-threaded; a constant quantiser was byte-identical over 360 encodes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
