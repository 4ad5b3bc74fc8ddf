"""Can a FROZEN, RANDOM tiny ImageBind see the demo corpus's attributes? A linear probe says.

For each modality and attribute: encode the training renders and the held-out renders with a randomly
initialised tiny ``imagebind.models.imagebind_model.ImageBindModel`` (eval, no grad), standardise the
pooled embeddings with the training statistics, fit a multinomial logistic regression on the training
renders and report held-out accuracy next to chance. The preprocessing here is a small local copy of
ImageBind's (224 px + CLIP normalisation; 128-bin kaldi fbank x 204 frames, 3 clips of 2 s; video:
5 clips x 2 frames x 3 spatial crops); the model's real preprocessing lives in ``toollmm.model``.

    python code/evaluate.py demo-probe --corpus data/demo [--out-dim 64] [--width 64]
"""

from __future__ import annotations

import json
import logging
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image

from toollmm.core.paths import resolve

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138


def tiny_imagebind(out_dim: int = 64, width: int = 64, blocks: int = 2, heads: int = 4, seed: int = 0):
    """A random ImageBindModel with every tower ``width`` wide and ``blocks`` deep; frozen, eval."""
    from toollmm.core import compat

    compat.apply()
    from imagebind.models.imagebind_model import ImageBindModel

    torch.manual_seed(seed)
    kw = {"out_embed_dim": out_dim}
    for tower in ("vision", "audio", "text", "depth", "thermal", "imu"):
        kw |= {f"{tower}_embed_dim": width, f"{tower}_num_blocks": blocks, f"{tower}_num_heads": heads}
    model = ImageBindModel(**kw).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _clip_starts(duration: float, clip: float, clips: int) -> list[float]:
    """ImageBind's ConstantClipsPerVideoSampler: ``clips`` starts evenly over ``duration - clip``."""
    step = Fraction(max(duration - clip, 0)).limit_denominator(10**6) / clips
    return [float(step * i) for i in range(clips)]


def image_tensor(path: Path) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def audio_tensor(path: Path, clips: int = 3, clip_s: float = 2.0, target: int = 204) -> torch.Tensor:
    import torchaudio

    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(wav.T[:1].copy())
    out = []
    for start in _clip_starts(wav.shape[1] / sr, clip_s, clips):
        piece = wav[:, int(start * sr) : int((start + clip_s) * sr)]
        piece = piece - piece.mean()
        fb = torchaudio.compliance.kaldi.fbank(
            piece, htk_compat=True, sample_frequency=sr, use_energy=False, window_type="hanning",
            num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
        ).T  # fmt: skip
        fb = torch.nn.functional.pad(fb, (0, max(0, target - fb.shape[1])))[:, :target]
        out.append(((fb - AUDIO_MEAN) / AUDIO_STD)[None])
    return torch.stack(out)  # (clips, 1, 128, 204)


def video_tensor(path: Path, clips: int = 5, clip_s: float = 2.0, frames: int = 2) -> torch.Tensor:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        decoded = [(float(f.pts * stream.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(stream)]
    times = np.array([t for t, _ in decoded])
    duration = float(times[-1] + (times[1] - times[0] if len(times) > 1 else 0))
    std = torch.tensor(CLIP_STD)[:, None, None, None]
    mean = torch.tensor(CLIP_MEAN)[:, None, None, None]
    out = []
    for start in _clip_starts(duration, clip_s, clips):
        idx = np.nonzero((times >= start - 1e-6) & (times < start + clip_s - 1e-6))[0]
        pick = idx[np.linspace(0, len(idx) - 1, frames).astype(int)]
        x = torch.from_numpy(np.stack([decoded[i][1] for i in pick])).float().div(255.0)  # T H W C
        x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(224, 224), mode="bilinear")
        out.append((x.permute(1, 0, 2, 3) - mean) / std)  # C T H W
    # square frames: ImageBind's 3 spatial crops are identical, keep them for equal averaging weight
    return torch.stack([v for v in out for _ in range(3)])  # (clips*3, C, T, H, W)


LOADERS = {
    "image": (image_tensor, "vision"),
    "audio": (audio_tensor, "audio"),
    "video": (video_tensor, "vision"),
}


@torch.no_grad()
def encode(model, modality: str, paths: list[Path], batch: int = 16) -> torch.Tensor:
    load, key = LOADERS[modality]
    feats = []
    for i in range(0, len(paths), batch):
        x = torch.stack([load(p) for p in paths[i : i + batch]])
        feats.append(model({key: x})[key])
    return torch.cat(feats)


def linear_probe(xtr, ytr, xte, yte, steps: int = 300, l2: float = 1e-3) -> float:
    """Multinomial logistic regression on standardised features (LBFGS); held-out accuracy."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    n_cls = int(max(ytr.max(), yte.max())) + 1
    lin = torch.nn.Linear(xtr.shape[1], n_cls)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float((lin(xte).argmax(1) == yte).float().mean())


def _load_split(corpus: Path, split: str, modality: str) -> list[dict]:
    path = corpus / split / f"x2t_{modality}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"probe: {path} not found (generate the corpus first)")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    key = {"image": "images", "audio": "audios", "video": "videos"}[modality]
    return [{"path": corpus / r[key][0], "attrs": r["meta"]["attributes"]} for r in recs]


def probe_corpus(corpus_dir, modalities=("image", "audio", "video"), limit: int | None = None, **model_kw):
    """Probe accuracy per modality and attribute on ``corpus_dir``'s x2t train vs held-out renders."""
    corpus = resolve(corpus_dir)
    model = tiny_imagebind(**model_kw)
    results = {}
    for m in modalities:
        t0 = time.time()
        tr, te = _load_split(corpus, "train", m)[:limit], _load_split(corpus, "heldout", m)[:limit]
        ftr, fte = encode(model, m, [r["path"] for r in tr]), encode(model, m, [r["path"] for r in te])
        results[m] = {"n_train": len(tr), "n_heldout": len(te)}
        for attr in tr[0]["attrs"]:
            values = sorted({r["attrs"][attr] for r in tr})
            ytr = torch.tensor([values.index(r["attrs"][attr]) for r in tr])
            yte = torch.tensor([values.index(r["attrs"][attr]) for r in te])
            acc = linear_probe(ftr, ytr, fte, yte)
            results[m][attr] = {"acc": round(acc, 4), "chance": round(1 / len(values), 4)}
        log.info("probe %s (%.1fs): %s", m, time.time() - t0, results[m])
    return results
