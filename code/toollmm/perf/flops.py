"""FLOP counts of a training step and of the frozen encoder (pure functions, no torch).

Training FLOPs of a LoRA step with frozen base weights (every formula here is per sample, summed by the
caller over a batch's real samples):

* linear layers: forward ``2 P`` per token, backward ``2 P`` (input gradients only; frozen weights get no
  weight gradient), so ``4 x body parameters x tokens``; body = everything but the input embedding and
  the LM head (attention, MLP and norms of every layer, the final norm);
* LM head: ``4 x vocab x hidden`` per position whose logits are computed. The trainer computes logits only
  where a supervised token is predicted (``toollmm.model.losses.next_token_targets``); the positions it
  never computes are not counted (counting them would credit skipped work as done);
* causal attention inside each sample of ``n`` tokens: forward ``QK^T`` and ``PV`` cost ``2 d (i+1)`` each
  for the ``i``-th query, i.e. ``2 d n (n+1)`` per layer; backward twice that (dS, dV, dQ, dK), so
  ``6 d n (n+1)`` per layer. Packed rows' masked-out pairs and padding are not counted.
* LoRA's own adapters (about 2% of a 7B model's q/k/v/o FLOPs at r 32) and the optimiser are not counted.

Encoder (ImageBind ViT towers, forward only, no grad): per token and block ``24 w^2`` (QKV, projection,
MLP with ratio 4) plus ``4 n w`` attention; the patch embedding adds ``2 x patch volume x w`` per token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int

    @classmethod
    def of(cls, config) -> LlamaShape:
        """From a ``transformers`` Llama config (or anything with the same attribute names)."""
        return cls(
            int(config.hidden_size),
            int(config.num_hidden_layers),
            int(config.intermediate_size),
            int(config.vocab_size),
            int(config.num_attention_heads),
            int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        )

    @property
    def body_params(self) -> int:
        """Non-embedding parameters without the LM head: attention, MLP, two norms per layer, final norm."""
        h, i = self.hidden, self.intermediate
        kv = h * self.kv_heads // self.heads
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return self.layers * per_layer + h

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return self.body_params + 2 * self.head_params  # untied embedding + head


#: Vicuna-7B v1.5 (Llama-2-7B shape)
VICUNA_7B = LlamaShape(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32, kv_heads=32)


def attention_train_flops(shape: LlamaShape, lengths) -> float:
    """Causal attention FLOPs (forward + backward) of samples of the given lengths."""
    return float(sum(6 * shape.layers * shape.hidden * n * (n + 1) for n in lengths))


def train_flops(shape: LlamaShape, lengths, logit_positions: int) -> float:
    """Model FLOPs of one training step over samples of ``lengths`` tokens, with logits computed at
    ``logit_positions`` positions (see the module docstring)."""
    tokens = sum(lengths)
    return (
        4.0 * shape.body_params * tokens
        + 4.0 * shape.head_params * logit_positions
        + attention_train_flops(shape, lengths)
    )


def forward_flops(shape: LlamaShape, lengths, logit_positions: int) -> float:
    """Forward-only FLOPs (inference): half the training count of the linear layers, a third of the
    attention's."""
    tokens = sum(lengths)
    attn = sum(2 * shape.layers * shape.hidden * n * (n + 1) for n in lengths)
    return 2.0 * shape.body_params * tokens + 2.0 * shape.head_params * logit_positions + attn


# ------------------------------------------------------------------------------------------ encoder
#: tokens per input through each ImageBind tower at its fixed input shapes: vision 224 px with
#: (2, 14, 14) patches on a 2-frame clip -> 16 x 16 + cls; audio 128 x 204 fbank, 16 x 16 patches,
#: stride 10 -> 12 x 19 + cls
VISION_TOKENS = 16 * 16 + 1
AUDIO_TOKENS = 12 * 19 + 1
VISION_PATCH = 3 * 2 * 14 * 14
AUDIO_PATCH = 16 * 16


def vit_forward_flops(width: int, blocks: int, tokens: int, patch_volume: int) -> float:
    """One tower's forward FLOPs for one input clip."""
    per_token = blocks * (24 * width * width + 4 * tokens * width) + 2 * patch_volume * width
    return float(tokens * per_token)


def encoder_flops_per_input(dims, preprocess, modality: str) -> float:
    """Forward FLOPs of one medium through the tower that encodes it (``dims``: ``EncoderDims``;
    ``preprocess``: ``PreprocessConfig``; video = clips x spatial crops vision inputs)."""
    if modality == "image":
        return vit_forward_flops(dims.vision_embed_dim, dims.vision_num_blocks, VISION_TOKENS, VISION_PATCH)
    if modality == "video":
        n = preprocess.video_clips * preprocess.video_spatial_crops
        return n * vit_forward_flops(
            dims.vision_embed_dim, dims.vision_num_blocks, VISION_TOKENS, VISION_PATCH
        )
    if modality == "audio":
        return preprocess.audio_clips * vit_forward_flops(
            dims.audio_embed_dim, dims.audio_num_blocks, AUDIO_TOKENS, AUDIO_PATCH
        )
    raise ValueError(f"unknown modality {modality!r}")


def width_for(
    target: float, blocks: int, tokens: int, patch_volume: int, multiple: int, clips: int = 1
) -> int:
    """The tower width (a multiple of ``multiple``, at least one multiple) whose forward FLOPs for
    ``clips`` inputs come closest to ``target``."""
    best, best_err = multiple, float("inf")
    w = multiple
    while True:
        f = clips * vit_forward_flops(w, blocks, tokens, patch_volume)
        err = abs(f - target)
        if err < best_err:
            best, best_err = w, err
        if f > target:
            return best
        w += multiple
