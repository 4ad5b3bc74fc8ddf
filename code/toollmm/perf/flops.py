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

Stages 1 and 2 train small parts on the frozen LLM, but the gradient still crosses the whole body, so the
body, head and attention terms above hold for them too (``stage1_flops``, ``stage2_flops``):

* stage 1 (``input_proj``): the projected media tokens are inputs of the first layer, so the backward
  computes input gradients through every layer down to them; plus the input projection's own products
  (``input_proj_train_flops``). With the feature cache on, the frozen encoder does not run in the step.
* stage 2 (``output_proj.*``, ``token_rows.signal``): the trained signal-token rows of the input embedding
  are inputs of the first layer and the LM loss is on (``lm: 1.0`` in config/stage_2.yaml), so the body
  runs forward AND backward (not forward-only); plus the output projections on every real signal span
  (``output_proj_train_flops``: 3 x forward, weights train and the input gradient flows on into the LLM).
* not counted: the new token rows' own small products in the embedding and LM head (44 rows), the output
  projections that run on a zero span for a modality the batch lacks (kept only so every ZeRO-3 rank
  makes the same module calls; wasted work, like padding), norms' and activations' element-wise work.

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


# ------------------------------------------------------------------------------ stages 1 and 2
def input_proj_train_flops(in_dim: int, hidden: int, tokens_per_input: int, kind: str, vectors: int) -> float:
    """The trained input projection on ``vectors`` encoder outputs (``toollmm.model.projections``):
    forward ``2 x in x out`` per linear layer and vector, backward ``2 x in x out`` for its weight gradient,
    plus ``2 x in x out`` input gradient for a layer whose input depends on a trained weight (the MLP's
    second layer; the first layer's input is data). ``linear``: in -> hidden x k; ``mlp``: in -> hidden
    -> hidden x k."""
    out = hidden * tokens_per_input
    if kind == "linear":
        per = 4 * in_dim * out
    elif kind == "mlp":
        per = 4 * in_dim * hidden + 6 * hidden * out
    else:
        raise ValueError(f"unknown input projection type {kind!r} (linear, mlp)")
    return float(per * vectors)


@dataclass(frozen=True)
class OutProjShape:
    """One output projection (``toollmm.model.projections.OutputProjection``): Linear(hidden -> d) ->
    pre-norm nn.Transformer (``enc_layers`` over the span, ``dec_layers`` over ``n_query`` learned queries,
    feed-forward width ``ff``) -> Linear(d -> cond_dim)."""

    hidden: int
    d_model: int
    ff: int
    enc_layers: int
    dec_layers: int
    n_query: int
    cond_dim: int

    @classmethod
    def of(cls, proj) -> OutProjShape:
        """From a built ``OutputProjection`` module (its real layer counts and widths)."""
        t = proj.transformer
        return cls(
            int(proj.hidden),
            int(proj.inp.out_features),
            int(t.encoder.layers[0].linear1.out_features),
            len(t.encoder.layers),
            len(t.decoder.layers),
            int(proj.n_query),
            int(proj.cond_dim),
        )


def output_proj_forward_flops(p: OutProjShape, span: int) -> float:
    """Forward FLOPs of one signal span of ``span`` tokens: per encoder layer ``S (8 d^2 + 4 d ff)``
    (q/k/v/o, MLP) plus ``4 S^2 d`` (full attention); per decoder layer, on ``Q`` queries, self-attention
    ``Q 8 d^2 + 4 Q^2 d``, cross-attention ``Q 4 d^2`` (q, o) ``+ S 4 d^2`` (k, v on the span) ``+ 4 Q S d``,
    MLP ``Q 4 d ff``; the input and output linears ``2 S hidden d + 2 Q d cond_dim``."""
    s, q, d, f = span, p.n_query, p.d_model, p.ff
    enc = s * (8 * d * d + 4 * d * f) + 4 * s * s * d
    dec = q * (8 * d * d + 4 * d * f) + 4 * q * q * d + 4 * d * d * (q + s) + 4 * q * s * d
    return float(2 * s * p.hidden * d + p.enc_layers * enc + p.dec_layers * dec + 2 * q * d * p.cond_dim)


def output_proj_attention_flops(p: OutProjShape, span: int) -> float:
    """The attention products' part of ``output_proj_forward_flops`` (scores and mixing: ``4 S^2 d`` per
    encoder layer, ``4 Q^2 d + 4 Q S d`` per decoder layer)."""
    s, q, d = span, p.n_query, p.d_model
    return float(p.enc_layers * 4 * s * s * d + p.dec_layers * (4 * q * q * d + 4 * q * s * d))


def output_proj_train_flops(p: OutProjShape, span: int) -> float:
    """A trained output projection on one span: 3 x forward (every product also computes its weight's and
    its input's gradient; the input gradient flows on into the LLM's hidden states)."""
    return 3.0 * output_proj_forward_flops(p, span)


def stage1_flops(shape: LlamaShape, lengths, logit_positions: int, input_proj: float) -> float:
    """Stage 1 step: ``train_flops`` (the gradient crosses the frozen body to the media tokens) plus the
    input projection's ``input_proj`` FLOPs (``input_proj_train_flops``)."""
    return train_flops(shape, lengths, logit_positions) + input_proj


def stage2_flops(shape: LlamaShape, lengths, logit_positions: int, spans) -> float:
    """Stage 2 step: ``train_flops`` (trained signal rows are inputs of the body, and the LM loss is on)
    plus ``output_proj_train_flops`` of each real signal span; ``spans``: ``(OutProjShape, span length,
    number of spans)`` per modality."""
    proj = sum(k * output_proj_train_flops(p, n) for p, n, k in spans)
    return train_flops(shape, lengths, logit_positions) + proj


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
