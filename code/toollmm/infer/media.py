"""Generated media: where files go (``MediaSink``) and how a signal span becomes one (``SignalDecoder``).

``SignalDecoder`` is the decode engine's signal hook: a complete ``[IMG0]..[IMGn]`` span's last-layer
hidden states go through the output projection (``toollmm.infer.step.project_signal``, exactly as in
training) into the modality's diffusers pipeline from a ``DecoderPool`` — built once, lazily, reused —
with the precomputed empty-prompt ``negative_prompt_embeds`` for guidance. The same pool backs the
built-in ``generate_<modality>(prompt)`` tools, conditioned by the pipeline's own text encoder.

Files are named ``<modality>_<n>.<png|mp4|wav>`` with ``n`` counting per modality over the session (never
overwriting an earlier output); the decoder seed is ``inference.seed + n``, recorded with each file.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ..model.decoders import DecoderError, DecoderPool
from ..model.media_out import SUFFIX
from .step import project_signal

log = logging.getLogger(__name__)

#: file suffixes read as each input modality (captioning / question answering through the model)
INPUT_SUFFIXES = {
    "image": (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    "video": (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"),
    "audio": (".wav", ".flac", ".mp3", ".ogg", ".m4a"),
}


def modality_of(path: str | Path) -> str:
    """The input modality of a media file, from its suffix; a clear error for anything else."""
    suffix = Path(path).suffix.lower()
    for modality, suffixes in INPUT_SUFFIXES.items():
        if suffix in suffixes:
            return modality
    known = ", ".join(s for v in INPUT_SUFFIXES.values() for s in v)
    raise ValueError(f"{path}: cannot tell whether this is an image, a video or an audio file ({known})")


class MediaSink:
    """The session's output folder and the list of media written into it (thread-safe)."""

    def __init__(self, out_dir: str | Path, seed: int = 0):
        self.out_dir = Path(out_dir)
        self.seed = int(seed)
        self.items: list[dict] = []
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()

    def reserve(self, modality: str, folder: str | Path | None = None) -> tuple[Path, int]:
        """A fresh file name for ``modality`` (in ``folder``, default the output folder) and its seed."""
        if modality not in SUFFIX:
            raise DecoderError(f"unknown output modality {modality!r} (known: {sorted(SUFFIX)})")
        root = Path(folder) if folder is not None else self.out_dir
        root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            n = self._count.get(modality, 0)
            while (root / f"{modality}_{n}{SUFFIX[modality]}").exists():
                n += 1
            self._count[modality] = n + 1
        return root / f"{modality}_{n}{SUFFIX[modality]}", self.seed + n

    def add(self, modality: str, path: str | Path, seed: int, origin: str) -> dict:
        """Record a written file; ``origin`` is ``signal`` or ``tool:<name>``. Returns its media entry."""
        entry = {"modality": modality, "path": str(Path(path).resolve()), "seed": int(seed)}
        with self._lock:
            self.items.append({**entry, "origin": origin})
        return entry

    def since(self, start: int) -> list[dict]:
        with self._lock:
            return list(self.items[start:])

    def __len__(self) -> int:
        return len(self.items)


class SignalDecoder:
    """Signal spans and text prompts -> media files through the model's diffusion decoders."""

    def __init__(self, model, pool: DecoderPool, sink: MediaSink):
        self.model, self.pool, self.sink = model, pool, sink

    def negative(self, modality: str) -> torch.Tensor | None:
        """The empty prompt's conditioning, computed once per modality (None when guidance is off)."""
        return (
            self.pool.negative_embeds(modality) if self.pool.config(modality).guidance_scale > 1.0 else None
        )

    def render(self, modality: str, prompt_embeds: torch.Tensor, origin: str, folder=None, path=None) -> dict:
        """Decode ``prompt_embeds`` into a new file (or into ``path``, seeded with the session seed)."""
        if path is None:
            path, seed = self.sink.reserve(modality, folder)
        else:
            seed = self.sink.seed
        self.pool.generate(
            modality, prompt_embeds, negative_prompt_embeds=self.negative(modality), seed=seed, out_path=path
        )
        return self.sink.add(modality, path, seed, origin)

    def __call__(self, *, row: int, modality: str, positions: list[int], hidden, state) -> dict:
        """The engine's signal hook: returns the media entry ``{"modality", "path", "seed"}``."""
        if hidden is None:
            raise DecoderError("the model returned no hidden states for the signal span")
        if modality not in self.model.output_proj:
            raise DecoderError(f"this model has no {modality} output projection")
        proj = next(self.model.output_proj[modality].parameters())
        embeds = project_signal(self.model, modality, hidden.to(device=proj.device, dtype=proj.dtype))
        return self.render(modality, embeds.float(), "signal")

    def from_prompt(self, modality: str, prompt: str, origin: str, folder=None, path=None) -> dict:
        """Text -> media with the pipeline's own text encoder (the built-in generation tools)."""
        embeds = self.pool.encode_captions(modality, [prompt])[0]
        return self.render(modality, embeds, origin, folder, path)
