"""Diffusion decoders: conditioning shapes read from the pipelines' configs, and a lazy pipeline pool.

``condition_shape(folder)`` reads a diffusers pipeline folder's JSON configs (no weights, no diffusers
import) and returns ``(n_query, cond_dim)``, the shape of the ``prompt_embeds`` its UNet consumes:
77 x 768 for SD v1.5, 77 x 1024 for ZeroScope v2 576w, 1 x 512 for AudioLDM. The output projections
take their query count and width from here, so swapping a decoder can never give a shape mismatch
(NExT-GPT #102). Text encoder and UNet must agree; a disagreement or a missing file is an error that
names the file.

``DecoderPool`` loads each modality's pipeline once, on first use, and reuses it. It encodes captions
with the pipeline's OWN text encoder (stage-2 alignment targets), precomputes the empty-prompt
embedding for classifier-free guidance, and turns ``prompt_embeds`` from the output projection into a
PNG, an MP4 or a WAV. Device and dtype are decided in one place (``device_and_dtype``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from toollmm.core.config import DecoderConfig
from toollmm.core.errors import UserError
from toollmm.core.paths import resolve
from toollmm.core.safefiles import naming_refused_pickles
from toollmm.model import media_out

log = logging.getLogger(__name__)

# The pipeline class each modality is driven as; a folder of another class is refused by the pool.
PIPELINE_CLASSES = {
    "image": "StableDiffusionPipeline",
    "video": "TextToVideoSDPipeline",
    "audio": "AudioLDMPipeline",
}
# Text encoders whose per-token last hidden states condition the UNet through cross-attention.
SEQUENCE_TEXT_ENCODERS = {"CLIPTextModel", "CLIPTextModelWithProjection"}
# Text encoders whose pooled, projected vector conditions the UNet as a class embedding (AudioLDM).
POOLED_TEXT_ENCODERS = {"ClapTextModelWithProjection"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DecoderError(UserError, ValueError):
    """A decoder folder, its configs or a generation request is unusable; the message names the file."""


# ------------------------------------------------------------------------------- config reading
def pipeline_folder(path: str | os.PathLike) -> Path:
    """A local pipeline folder (relative paths from the repo root), or the configs of a Hub id."""
    local = resolve(path)
    if local is None:
        raise DecoderError("decoder path is empty (set model.decoders.<modality>.path)")
    if local.is_dir():
        return local
    if not Path(str(path)).is_absolute() and _HUB_ID.match(str(path)):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path), allow_patterns=["*.json"]))
        except Exception as e:  # offline, unknown repo, no access: all the same to the caller
            raise DecoderError(
                f"decoder {path!r}: no folder at {local}, and the Hub repo's configs could not be fetched "
                f"({type(e).__name__}: {e})"
            ) from None
    raise DecoderError(f"decoder folder not found: {local} (see pretrained_checkpoint/README.md)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DecoderError(f"{path}: file not found (not a complete diffusers pipeline folder)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DecoderError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise DecoderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _positive_int(cfg: dict, key: str, path: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DecoderError(f"{path}: `{key}` must be a positive integer, got {value!r}")
    return value


def _component_class(index: dict, name: str, path: Path) -> str:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        raise DecoderError(f"{path}: no usable `{name}` component (got {entry!r})")
    return entry[1]


def pipeline_class(pipeline_dir: str | os.PathLike) -> str:
    """The ``_class_name`` recorded in the folder's ``model_index.json``."""
    path = pipeline_folder(pipeline_dir) / "model_index.json"
    name = _read_json(path).get("_class_name")
    if not isinstance(name, str):
        raise DecoderError(f"{path}: missing `_class_name`")
    return name


def condition_shape(pipeline_dir: str | os.PathLike) -> tuple[int, int]:
    """``(n_query, cond_dim)`` of the ``prompt_embeds`` the pipeline's UNet consumes, from its configs."""
    root = pipeline_folder(pipeline_dir)
    index_path, te_path, unet_path = (
        root / "model_index.json",
        root / "text_encoder" / "config.json",
        root / "unet" / "config.json",
    )
    encoder = _component_class(_read_json(index_path), "text_encoder", index_path)
    te, unet = _read_json(te_path), _read_json(unet_path)
    if encoder in SEQUENCE_TEXT_ENCODERS:
        n_query = _positive_int(te, "max_position_embeddings", te_path)
        dim = _positive_int(te, "hidden_size", te_path)
        cross = unet.get("cross_attention_dim")
        if cross != dim:
            raise DecoderError(
                f"{unet_path}: cross_attention_dim {cross!r} does not match the text encoder's "
                f"hidden_size {dim} in {te_path}"
            )
        tok_path = root / "tokenizer" / "tokenizer_config.json"
        if tok_path.is_file():  # the pipeline pads prompts to the tokenizer's model_max_length
            max_len = _read_json(tok_path).get("model_max_length")
            if max_len != n_query:
                raise DecoderError(
                    f"{tok_path}: model_max_length {max_len!r} does not match max_position_embeddings "
                    f"{n_query} in {te_path}"
                )
        return n_query, dim
    if encoder in POOLED_TEXT_ENCODERS:
        dim = _positive_int(te, "projection_dim", te_path)
        kind, width = unet.get("class_embed_type"), unet.get("projection_class_embeddings_input_dim")
        if kind != "simple_projection" or width != dim:
            raise DecoderError(
                f"{unet_path}: expected class_embed_type 'simple_projection' with "
                f"projection_class_embeddings_input_dim {dim} (projection_dim in {te_path}), "
                f"got {kind!r} / {width!r}"
            )
        return 1, dim
    known = sorted(SEQUENCE_TEXT_ENCODERS | POOLED_TEXT_ENCODERS)
    raise DecoderError(f"{index_path}: text encoder {encoder!r} is not supported (known: {known})")


def condition_shapes(decoders: Mapping[str, DecoderConfig]) -> dict[str, tuple[int, int]]:
    """``{modality: (n_query, cond_dim)}`` for every enabled decoder (``cfg.model.decoders``)."""
    return {m: condition_shape(c.path) for m, c in decoders.items() if c.path}


# --------------------------------------------------------------------------------- device/dtype
def device_and_dtype(dtype: str = "auto", device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """THE place decoder precision is decided: float32 on CPU always; on CUDA the requested dtype,
    'auto' meaning bfloat16 where supported, else float16."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DecoderError(f"decoder device {device!r} requested but CUDA is not available to torch")
    if dev.type != "cuda":
        if dtype not in ("auto", "float32"):
            log.info("decoders run in float32 on %s (requested %s)", dev, dtype)
        return dev, torch.float32
    if dtype == "auto":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, getattr(torch, dtype)


# ------------------------------------------------------------------------------------------ pool
class DecoderPool:
    """One lazily constructed pipeline per modality, reused for every request (thread-safe)."""

    def __init__(self, decoders: Mapping[str, DecoderConfig]):
        self.configs = dict(decoders)
        self.constructions: Counter[str] = Counter()
        self._pipes: dict[str, object] = {}
        self._negatives: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def config(self, modality: str) -> DecoderConfig:
        cfg = self.configs.get(modality)
        if cfg is None:
            raise DecoderError(f"no decoder configured for {modality!r} (configured: {sorted(self.configs)})")
        if not cfg.path:
            raise DecoderError(f"the {modality} decoder is disabled (model.decoders.{modality}.path is null)")
        return cfg

    def enabled(self) -> list[str]:
        return [m for m, c in self.configs.items() if c.path]

    def condition_shape(self, modality: str) -> tuple[int, int]:
        if modality not in self._shapes:
            self._shapes[modality] = condition_shape(self.config(modality).path)
        return self._shapes[modality]

    def pipeline(self, modality: str):
        """The modality's pipeline, loaded by path on first use (``DiffusionPipeline.from_pretrained``)."""
        with self._lock:
            if modality not in self._pipes:
                self._pipes[modality] = self._load(modality)
            return self._pipes[modality]

    def _load(self, modality: str):
        from diffusers import DiffusionPipeline

        cfg = self.config(modality)
        want = PIPELINE_CLASSES.get(modality)
        folder = pipeline_folder(cfg.path)
        got = pipeline_class(folder)
        if got != want:
            raise DecoderError(
                f"{folder / 'model_index.json'}: {modality} needs a {want}, this folder is a {got}"
            )
        device, dtype = device_and_dtype(cfg.dtype, cfg.device)
        start = time.perf_counter()
        local = resolve(cfg.path)
        source = str(local) if local.is_dir() else str(cfg.path)  # a Hub id: diffusers fetches it whole
        with naming_refused_pickles(f"model.decoders.{modality}.path", source):  # .bin: weights_only
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        self.constructions[modality] += 1
        elapsed = time.perf_counter() - start
        log.info(
            "%s decoder %s loaded from %s in %.2fs (%s, %s)",
            modality,
            type(pipe).__name__,
            source,
            elapsed,
            device,
            dtype,
        )
        return pipe

    @torch.no_grad()
    def encode_captions(self, modality: str, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """``[len(texts), n_query, cond_dim]`` float32 on CPU: the pipeline's own text-encoder conditioning
        for each caption, exactly what it would feed its UNet (the stage-2 alignment target)."""
        if isinstance(texts, str) or not texts:
            raise DecoderError(f"encode_captions({modality!r}): pass a non-empty list of strings")
        pipe = self.pipeline(modality)
        device = pipe._execution_device
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i : i + batch_size])
            if modality == "audio":  # AudioLDM: one pooled, L2-normalised CLAP vector per caption
                emb = pipe._encode_prompt(chunk, device, 1, False).unsqueeze(1)
            else:
                emb = pipe.encode_prompt(chunk, device, 1, False)[0]
            out.append(emb.float().cpu())
        return torch.cat(out)

    def negative_embeds(self, modality: str) -> torch.Tensor:
        """``[n_query, cond_dim]``: the empty prompt's conditioning, computed once (guidance needs no
        tokenizer call at generation time)."""
        if modality not in self._negatives:
            self._negatives[modality] = self.encode_captions(modality, [""])[0]
        return self._negatives[modality]

    def _as_condition(self, modality: str, name: str, embeds: torch.Tensor) -> torch.Tensor:
        want = self.condition_shape(modality)
        if not isinstance(embeds, torch.Tensor):
            raise DecoderError(f"{name} for {modality}: expected a tensor, got {type(embeds).__name__}")
        x = embeds[0] if embeds.dim() == 3 and embeds.shape[0] == 1 else embeds
        if tuple(x.shape) != want:
            raise DecoderError(
                f"{name} for {modality} has shape {tuple(embeds.shape)}; the decoder at "
                f"{self.config(modality).path} takes {want} (n_query, cond_dim), read from its configs"
            )
        if not torch.isfinite(x).all():
            raise DecoderError(f"{name} for {modality} contains NaN or inf")
        pipe = self.pipeline(modality)
        x = x.to(device=pipe._execution_device, dtype=pipe.unet.dtype).unsqueeze(0)
        return x[:, 0] if modality == "audio" else x  # AudioLDM takes [batch, dim]

    @torch.no_grad()
    def generate(
        self,
        modality: str,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        seed: int = 0,
        out_path: str | os.PathLike = "generated",
    ) -> Path:
        """Run the pipeline on ``prompt_embeds`` (``[n_query, cond_dim]`` or ``[1, n_query, cond_dim]``)
        and write a PNG / MP4 / WAV to ``out_path`` (suffix added if missing). Deterministic per seed."""
        cfg = self.config(modality)
        path = media_out.output_path(out_path, modality)
        pipe = self.pipeline(modality)
        kwargs = {
            "prompt_embeds": self._as_condition(modality, "prompt_embeds", prompt_embeds),
            "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale,
            "generator": torch.Generator(device="cpu").manual_seed(int(seed)),
        }
        if cfg.guidance_scale > 1.0:
            negative = (
                self.negative_embeds(modality) if negative_prompt_embeds is None else negative_prompt_embeds
            )
            kwargs["negative_prompt_embeds"] = self._as_condition(
                modality, "negative_prompt_embeds", negative
            )
        start = time.perf_counter()
        if modality == "image":
            image = pipe(**kwargs, height=cfg.height, width=cfg.width, output_type="np").images[0]
            media_out.write_png(image, path)
        elif modality == "video":
            extra = {"num_frames": cfg.num_frames} if cfg.num_frames else {}
            frames = pipe(**kwargs, height=cfg.height, width=cfg.width, output_type="np", **extra).frames[0]
            media_out.write_mp4(frames, path, fps=cfg.fps)
        else:
            audio = pipe(**kwargs, audio_length_in_s=cfg.audio_length_s, output_type="np").audios[0]
            media_out.write_wav(audio, path, sample_rate=pipe.vocoder.config.sampling_rate)
        log.info("%s written to %s in %.2fs", modality, path, time.perf_counter() - start)
        return path
