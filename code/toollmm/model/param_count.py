"""Closed-form trainable-parameter counts, checked against a Vicuna-7B-shaped model on the meta device.

Notation: H hidden size, L layers, A attention heads, G key/value heads, I MLP width, r LoRA rank,
D encoder output dim, k ``tokens_per_input``, and per output modality: d ``d_model``, f ``dim_feedforward``,
E / F encoder / decoder layers, q query count, c conditioning dim.

* LoRA: ``L * r * sum over targets (in + out)`` with (in, out) = q_proj (H, H), k_proj / v_proj
  (H, H*G/A), o_proj (H, H), gate_proj / up_proj (H, I), down_proj (I, H).
  q/k/v/o with G = A: ``8 * L * r * H``.
* token rows: ``n * H`` per matrix, x2 when the lm_head is untied (n: signal 4+24+8 = 36, tool 4).
* input projection: linear ``D*H*k + H*k``; mlp ``D*H + H + H*H*k + H*k``.
* output projection (Linear(H->d) + queries + nn.Transformer(norm_first) + Linear(d->c)):
  ``H*d + d + q*d + E*(4d^2 + 2df + 9d + f) + F*(8d^2 + 2df + 15d + f) + 4d + d*c + c``
  (encoder layer: attention 4d^2+4d, MLP 2df+f+d, 2 LayerNorms 4d; decoder layer: 2 attentions, MLP,
  3 LayerNorms; 4d = the final encoder and decoder norms).

Vicuna-7B (H 4096, L 32, A = G 32, D 1024, k 1, linear, r 32 on q/k/v/o, untied head, d 512, f 2048,
E = F = 4; SD v1.5 77x768, ZeroScope 77x1024, AudioLDM 1x512):

    LoRA 33,554,432; input_proj 4,198,400; output_proj image 31,958,784, video 32,090,112,
    audio 31,788,544 (sum 95,837,440); signal rows 294,912; tool rows 32,768
    stage 1 [input_proj]                                   4,198,400
    stage 2 [output_proj.* + token_rows.signal]           96,132,352
    stage 3 [lora + input_proj + output_proj.* + rows]   133,917,952
"""

from __future__ import annotations

_LORA_SHAPES = {
    "q_proj": lambda h, i, kv: (h, h),
    "k_proj": lambda h, i, kv: (h, kv),
    "v_proj": lambda h, i, kv: (h, kv),
    "o_proj": lambda h, i, kv: (h, h),
    "gate_proj": lambda h, i, kv: (h, i),
    "up_proj": lambda h, i, kv: (h, i),
    "down_proj": lambda h, i, kv: (i, h),
}


def lora_count(
    hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, r: int, targets
) -> int:
    kv = hidden * kv_heads // heads
    total = 0
    for t in targets:
        if t not in _LORA_SHAPES:
            raise ValueError(f"no closed form for LoRA target {t!r} (known: {list(_LORA_SHAPES)})")
        a, b = _LORA_SHAPES[t](hidden, intermediate, kv)
        total += r * (a + b)
    return layers * total


def input_proj_count(enc_dim: int, hidden: int, kind: str, tokens_per_input: int) -> int:
    k = tokens_per_input
    if kind == "linear":
        return enc_dim * hidden * k + hidden * k
    return enc_dim * hidden + hidden + hidden * hidden * k + hidden * k


def output_proj_count(hidden: int, n_query: int, cond_dim: int, d: int, ff: int, enc: int, dec: int) -> int:
    enc_layer = 4 * d * d + 2 * d * ff + 9 * d + ff
    dec_layer = 8 * d * d + 2 * d * ff + 15 * d + ff
    return hidden * d + d + n_query * d + enc * enc_layer + dec * dec_layer + 4 * d + d * cond_dim + cond_dim


def token_rows_count(hidden: int, n_rows: int, tied: bool) -> int:
    return n_rows * hidden * (1 if tied else 2)
