"""Test helpers for the data stream: synthetic records with real PNG/WAV files, a toy renderer with Data A's
output protocol, and a light media decoder (the real ones are covered by their own tests)."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from toollmm.core.batch import IGNORE_INDEX
from toollmm.core.tokens import PLACEHOLDER_RE, TokenContract
from toollmm.data.records import BadSample

WORDS = "red green blue circle square triangle moving left right up down small large tone high low".split()
CONTRACT = TokenContract({"image": 2, "video": 2, "audio": 2})


def png_bytes(seed: int, size: int = 16) -> bytes:
    from PIL import Image

    rgb = tuple(int(x) for x in np.random.default_rng(seed).integers(0, 255, 3))
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seed: int, seconds: float = 0.25, rate: int = 16000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * (220 + 20 * seed) * t).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def make_record(i: int, rng: random.Random, media_dir: Path | None, source: str = "syn") -> dict:
    """A record of one of four kinds (text, image, audio, text->image), with 3..40 words of answer."""
    kind = ("text", "image", "audio", "t2x")[i % 4] if media_dir is not None else "text"
    answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    rec = {"id": f"{source}-{i:05d}", "source": source, "messages": []}
    if kind == "image":
        (media_dir / f"im{i}.png").write_bytes(png_bytes(i))
        rec["images"] = [f"im{i}.png"]
        rec["messages"] = [{"role": "user", "content": "<image> what is this?"}]
    elif kind == "audio":
        (media_dir / f"au{i}.wav").write_bytes(wav_bytes(i % 7))
        rec["audios"] = [f"au{i}.wav"]
        rec["messages"] = [{"role": "user", "content": "describe <audio>"}]
    else:
        rec["messages"] = [{"role": "user", "content": "say something"}]
    msg = {"role": "assistant", "content": answer}
    if kind == "t2x":
        msg["generate"] = [{"modality": "image", "caption": answer}]
    rec["messages"].append(msg)
    return rec


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_source(root: Path, n: int, name: str = "syn", seed: int = 0, media: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    return write_jsonl(
        root / f"{name}.jsonl", [make_record(i, rng, root if media else None, name) for i in range(n)]
    )


class ToyRenderer:
    """Stand-in for Data A's ``Renderer.render``: same output fields, a trivial ``ROLE: text`` layout."""

    def __init__(self, tokenizer, media_tokens: dict[str, int] | None = None):
        self.tok = tokenizer
        self.ids = CONTRACT.add_to(tokenizer)
        self.media_tokens = media_tokens or {"image": 1, "video": 1, "audio": 1}

    def _text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def __call__(self, record: dict, where: str | None = None):
        ids, labels, media, signals, used = [self.tok.bos_token_id], [IGNORE_INDEX], [], [], Counter()
        for m in record["messages"]:
            head = self._text(f" {m['role'].upper()}:")
            ids += head
            labels += [IGNORE_INDEX] * len(head)
            train = m["role"] == "assistant" and m.get("train", True)
            pieces = PLACEHOLDER_RE.split(m["content"])  # text, modality, text, ...
            for k, piece in enumerate(pieces):
                if k % 2:
                    media.append((piece, record[piece + "s"][used[piece]]))
                    used[piece] += 1
                    ids += [self.ids.placeholder[piece]] * self.media_tokens[piece]
                    labels += [IGNORE_INDEX] * self.media_tokens[piece]
                else:
                    t = self._text(piece)
                    ids += t
                    labels += t if train else [IGNORE_INDEX] * len(t)
            for g in m.get("generate") or []:
                span = self.ids.signal[g["modality"]]
                signals.append(SimpleNamespace(start=len(ids), modality=g["modality"], train=train))
                ids += span
                labels += span if train else [IGNORE_INDEX] * len(span)
        ids.append(self.tok.eos_token_id)
        labels.append(self.tok.eos_token_id)
        return SimpleNamespace(input_ids=ids, labels=labels, media=media, signals=signals)


class ToyDecoder:
    """PNG -> ``[3, 4, 4]`` pixels, WAV -> ``[1, 8]`` "features"; undecodable bytes -> corrupt_media."""

    def __call__(self, modality, media, where):
        try:
            if modality == "image":
                from PIL import Image

                with Image.open(io.BytesIO(media.data)) as im:
                    arr = np.asarray(im.convert("RGB").resize((4, 4)), dtype=np.float32) / 255.0
                return "pixels", torch.from_numpy(arr).permute(2, 0, 1).contiguous()
            import soundfile as sf

            wave, _ = sf.read(io.BytesIO(media.data), dtype="float32")
            return "features", torch.from_numpy(np.ascontiguousarray(wave[:8])).view(1, 8)
        except Exception as e:
            raise BadSample("corrupt_media", where, f"{media.name}: {e}") from None
