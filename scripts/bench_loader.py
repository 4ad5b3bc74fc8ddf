"""Data-loader benchmark: samples/s of the training stream and the real-token fraction of its batches.

    python scripts/bench_loader.py                         # 3000 synthetic records with small PNG/WAV media
    python scripts/bench_loader.py --input data/demo/train/*.jsonl --media-root data/demo/train

Runs the real path: JSONL (or, with --shards, webdataset shards written first) -> record checks -> Data A's
renderer -> the encoder's preprocessing (ImageBind sizes: 224 px images, 3 x 128 x 204 fbank audio) ->
collation, in --workers DataLoader workers. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "a the red green blue circle square triangle moves left right up down small large tone high low".split()
)


def synthetic(root: Path, n: int, seed: int = 0) -> Path:
    """Instruction records of very different lengths; a third with a 64 px PNG, a third with a 1 s WAV."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "bench.jsonl", "w") as f:
        for i in range(n):
            words = int(min(400, rng.lognormvariate(3.3, 0.9)))  # median ~27 words, long tail
            rec = {"id": f"b{i}", "source": "bench", "messages": [{"role": "user", "content": "tell me"}]}
            if i % 3 == 1:
                buf = io.BytesIO()
                Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
                (root / f"{i}.png").write_bytes(buf.getvalue())
                rec["images"], rec["messages"][0]["content"] = [f"{i}.png"], "<image> tell me"
            elif i % 3 == 2:
                t = np.arange(16000) / 16000
                sf.write(
                    root / f"{i}.wav",
                    (0.3 * np.sin(2 * np.pi * (200 + i % 50 * 10) * t)).astype("float32"),
                    16000,
                )
                rec["audios"], rec["messages"][0]["content"] = [f"{i}.wav"], "<audio> tell me"
            answer = " ".join(rng.choice(WORDS) for _ in range(max(1, words)))
            rec["messages"].append({"role": "assistant", "content": answer})
            f.write(json.dumps(rec) + "\n")
    return root / "bench.jsonl"


def run(sources, proc, args, **kw) -> dict:
    from toollmm.data.stream import StreamSettings, TrainStream

    settings = StreamSettings(
        micro_batch_size=args.micro_batch,
        pad_id=0,
        num_workers=args.workers,
        max_length=args.max_length,
        on_error="skip",
        overlong="skip",
        **kw,
    )
    stream = TrainStream(sources, proc, settings)
    t0 = time.perf_counter()
    n = real = cells = 0
    first = None
    for b in stream:
        first = first or time.perf_counter()
        n += sum(len(r) for r in b.sample_ids)
        real, cells = real + b.real_tokens, cells + b.input_ids.numel()
    wall = time.perf_counter() - t0
    return {
        "samples": n,
        "wall_s": round(wall, 2),
        "samples_per_s": round(n / wall, 1),
        "first_batch_s": round(first - t0, 2),
        "real_token_fraction": round(real / cells, 3),
        "skipped": dict(stream.skipped),
        **kw,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="*", help="unified JSONL file(s); default: synthetic records")
    p.add_argument("--media-root", default=None, help="media root of --input")
    p.add_argument("--records", type=int, default=3000, help="synthetic records")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--shards", action="store_true", help="also measure from webdataset shards")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as d:
        measure(Path(d), args)
    return 0


def measure(tmp: Path, args) -> None:
    from transformers import AutoTokenizer

    from toollmm.core.config import load_config
    from toollmm.core.tokens import TokenContract
    from toollmm.data.pipeline import make_processor
    from toollmm.data.shards import ShardSource, write_shards
    from toollmm.data.sources import JsonlSource
    from toollmm.model.tiny_tokenizer import build_sentencepiece_tokenizer

    paths = [Path(x) for x in args.input] if args.input else [synthetic(tmp / "syn", args.records)]
    cfg = load_config(overrides=[f"data.max_length={args.max_length}"]).config
    with open(paths[0]) as f:
        text = [m["content"] for line in f if line.strip() for m in json.loads(line)["messages"]][:4000]
    tok = AutoTokenizer.from_pretrained(
        build_sentencepiece_tokenizer([cfg.model.system_prompt, *text], tmp / "tok")
    )
    TokenContract.from_config(cfg.model.tokens).add_to(tok)
    proc = make_processor(cfg, tok)
    root = args.media_root
    sources = [JsonlSource(x, media_root=root) for x in paths]
    env = {
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "micro_batch": args.micro_batch,
        "max_length": args.max_length,
        "records": sum(len(s) for s in sources),
    }
    print(json.dumps({"env": env}))
    for kw in [{"group_by_length": g, "packing": p} for p in (False, True) for g in (True, False)]:
        print(json.dumps({"source": "jsonl", **run(sources, proc, args, **kw)}))
    if args.shards:
        shard_sources = []
        for k, s in enumerate(sources):
            write_shards(s, tmp / f"sh{k}", 1000, on_error="skip")
            shard_sources.append(ShardSource(tmp / f"sh{k}"))
        print(
            json.dumps(
                {"source": "shards", **run(shard_sources, proc, args, group_by_length=True, packing=False)}
            )
        )


if __name__ == "__main__":
    sys.exit(main())
