"""Time the frozen encoder, its preprocessing and the feature cache on generated media.

    python scripts/bench_encoder.py                                   # tiny encoder (config/presets/encoder_tiny.yaml)
    python scripts/bench_encoder.py --config config/model.yaml --device cuda   # ImageBind-huge (needs its checkpoint)

Prints median milliseconds: encoder forward per modality (batch 1 and 8), preprocessing of one file per
modality, and a feature-cache miss vs hit for a 640x480 PNG (a fresh FeatureCache per lookup, so the hit
includes hashing the file). Writes only to a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from toollmm.core.config import load_config  # noqa: E402
from toollmm.data.preprocess import load_media  # noqa: E402
from toollmm.model.encoder import build_encoder  # noqa: E402
from toollmm.model.feature_cache import FeatureCache  # noqa: E402


def make_media(folder: Path) -> dict[str, Path]:
    import av
    import soundfile as sf
    from PIL import Image

    rs = np.random.RandomState(0)
    for i in range(20):
        Image.fromarray(rs.randint(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    t = np.arange(160000) / 16000
    sf.write(folder / "a.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    with av.open(str(folder / "v.mp4"), "w") as box:
        stream = box.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(100):
            frame = np.zeros((240, 320, 3), np.uint8)
            frame[:, (3 * i) % 300 : (3 * i) % 300 + 20] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return {"image": folder / "img0.png", "audio": folder / "a.wav", "video": folder / "v.mp4"}


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="config/presets/encoder_tiny.yaml", help="YAML layer over model.yaml"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = load_config(config_files=[args.config], overrides=args.overrides).config.model
    encoder = build_encoder(cfg, device=args.device)
    print(f"encoder {encoder.identity} out_dim {encoder.out_dim}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        media = make_media(folder)
        for modality in ("image", "audio", "video"):
            for n in (1, 8):
                x = torch.randn(n, *encoder.input_shape(modality))
                encoder.encode(modality, x)  # warm-up
                ms = median_ms(lambda x=x, m=modality: encoder.encode(m, x), args.repeats)
                print(f"forward     {modality:5s} batch {n}: {ms:8.1f} ms")
            src = media[modality]
            ms = median_ms(lambda s=src, m=modality: load_media(m, s, cfg.preprocess), args.repeats)
            print(f"preprocess  {modality:5s} {src.name}: {ms:8.1f} ms")
        images = sorted(folder.glob("img*.png"))
        for label in ("miss", "hit"):
            times = []
            for path in images:
                cache = FeatureCache(folder / "cache", encoder)
                start = time.perf_counter()
                cache.get("image", path)
                times.append(time.perf_counter() - start)
            print(f"cache {label:4s} image 640x480 PNG: {1e3 * statistics.median(times):8.2f} ms")


if __name__ == "__main__":
    main()
