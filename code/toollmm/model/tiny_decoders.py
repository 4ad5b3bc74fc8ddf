"""Tiny, random diffusion pipelines with the real pipelines' layout, for tests and the demo.

``build_tiny_decoders(out_dir)`` writes three diffusers pipeline folders (StableDiffusion, TextToVideoSD,
AudioLDM), each with its own text encoder AND tokenizer, via ``save_pretrained``. They load back by path
exactly like ``pretrained_checkpoint/diffusion/*`` (``DiffusionPipeline.from_pretrained(folder)``), so
the code that drives them is the code that drives the real decoders; only the sizes differ.

Tokenizers are built offline: the CLIP tokenizer from the BPE merges that the ``imagebind`` package
ships (OpenAI CLIP's vocabulary cut to its first ``num_merges`` merges; all 48894 give CLIP's own), the
Roberta tokenizer (CLAP's) by training a byte-level BPE on a few captions with ``tokenizers``.
Conditioning shapes are deliberately different per modality (query count and width), so a swapped
decoder or projection fails loudly; they are read back with ``toollmm.model.decoders.condition_shape``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from toollmm.core.files import respect_umask

log = logging.getLogger(__name__)

_CAPTIONS = (
    "a red circle moving left",
    "a small blue square on a white background",
    "a green triangle rotating slowly",
    "a high tone followed by a low tone",
    "a short beep and a long hum",
    "the quick brown fox jumps over the lazy dog 0123456789",
)


@dataclass(frozen=True)
class TinySpec:
    """Conditioning shape of one tiny decoder (n_query tokens of cond_dim each)."""

    n_query: int
    cond_dim: int


DEFAULT_SPECS = {
    "image": TinySpec(n_query=16, cond_dim=32),
    "video": TinySpec(n_query=20, cond_dim=24),
    "audio": TinySpec(n_query=1, cond_dim=16),  # AudioLDM: one pooled CLAP vector
}
FOLDERS = {"image": "tiny-sd", "video": "tiny-t2v", "audio": "tiny-audioldm"}
# Scheduler settings of the real checkpoints (SD v1.5: PNDM; ZeroScope and AudioLDM: DDIM).
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_AUDIOLDM_BETAS = {"beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear"}


# ------------------------------------------------------------------------------------ tokenizers
def imagebind_bpe_path() -> Path:
    """The CLIP BPE merges file inside the installed ``imagebind`` package (found without importing it)."""
    spec = importlib.util.find_spec("imagebind")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package `imagebind` (imagebind-unofficial) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}")
    return path


def build_clip_tokenizer(out_dir: str | Path, model_max_length: int, num_merges: int = 2000):
    """A ``CLIPTokenizer`` with OpenAI CLIP's byte alphabet and its first ``num_merges`` merges.

    Vocabulary order follows CLIP: 256 byte symbols, the same with ``</w>``, merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (so the full 48894-merge vocabulary has 49408 entries)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(imagebind_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 1 + min(num_merges, 48894)]]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(
        vocab={s: i for i, s in enumerate(vocab_list)},
        merges=merges,
        model_max_length=model_max_length,
    )
    tok.save_pretrained(out_dir)
    return tok


def build_roberta_tokenizer(
    out_dir: str | Path, model_max_length: int, texts: Iterable[str] = _CAPTIONS, vocab_size: int = 400
):
    """A byte-level BPE ``RobertaTokenizer`` (CLAP's tokenizer type) trained on ``texts``.

    Special tokens sit at RoBERTa's ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then ``<mask>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = RobertaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=model_max_length)
    tok.save_pretrained(out_dir)
    return tok


# ------------------------------------------------------------------------------------- pipelines
def _clip_text_encoder(tok, spec: TinySpec):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=spec.cond_dim,
        intermediate_size=2 * spec.cond_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=spec.n_query,
        projection_dim=spec.cond_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(cfg).eval()


def _vae(in_out_channels: int = 3):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=in_out_channels,
        out_channels=in_out_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _image_pipeline(folder: Path, spec: TinySpec):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = build_clip_tokenizer(folder / "tokenizer", spec.n_query)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=spec.cond_dim,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_clip_text_encoder(tok, spec),
        tokenizer=tok,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, **_SD_BETAS),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _video_pipeline(folder: Path, spec: TinySpec):
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    tok = build_clip_tokenizer(folder / "tokenizer", spec.n_query)
    unet = UNet3DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 16),  # narrower than the image UNet: every layer runs once per frame
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=spec.cond_dim,
    )
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **_SD_BETAS)
    return TextToVideoSDPipeline(
        vae=_vae(), text_encoder=_clip_text_encoder(tok, spec), tokenizer=tok, unet=unet, scheduler=scheduler
    )


def _audio_pipeline(folder: Path, spec: TinySpec, max_text_tokens: int = 32):
    from diffusers import AudioLDMPipeline, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    tok = build_roberta_tokenizer(folder / "tokenizer", max_text_tokens)
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_text_tokens + 2,  # RoBERTa positions start after the padding id
            projection_dim=spec.cond_dim,
            projection_hidden_size=32,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    channels = (16, 32)
    unet = UNet2DConditionModel(  # AudioLDM's layout: self-attention only, text enters as a class embedding
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=channels,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=spec.cond_dim,
        class_embeddings_concat=True,
    )
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=16,  # mel bins; the VAE halves them into the latent width
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=(8, 8),
            upsample_kernel_sizes=(16, 16),
            resblock_kernel_sizes=(3,),
            resblock_dilation_sizes=((1, 3),),
            normalize_before=False,
        )
    ).eval()
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_AUDIOLDM_BETAS)
    return AudioLDMPipeline(
        vae=_vae(in_out_channels=1),
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        vocoder=vocoder,
    )


_BUILDERS = {"image": _image_pipeline, "video": _video_pipeline, "audio": _audio_pipeline}


def build_tiny_decoders(
    out_dir: str | Path,
    seed: int = 0,
    specs: dict[str, TinySpec] | None = None,
    modalities: Iterable[str] = ("image", "video", "audio"),
) -> dict[str, Path]:
    """Build, seed and ``save_pretrained`` one tiny pipeline per modality; returns ``{modality: folder}``.

    Deterministic for a given ``seed`` (the global torch RNG is left untouched)."""
    specs = {**DEFAULT_SPECS, **(specs or {})}
    out = Path(out_dir)
    folders: dict[str, Path] = {}
    for i, modality in enumerate(modalities):
        if modality not in _BUILDERS:
            raise ValueError(f"build_tiny_decoders: unknown modality {modality!r} (known: {list(_BUILDERS)})")
        folder = out / FOLDERS[modality]
        folder.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            pipe = _BUILDERS[modality](folder, specs[modality])
        pipe.save_pretrained(folder)
        respect_umask(folder)  # safetensors writes 0600
        log.info("tiny %s decoder written to %s (%s)", modality, folder, type(pipe).__name__)
        folders[modality] = folder
    return folders
