"""SDPA that attends inside each packed sample only: ``flash_attention_2``'s variable-length idea for the
``sdpa`` kernels (CPU included).

A packed row holds several samples whose ``position_ids`` restart at 0. Handing SDPA the dense block-diagonal
``[B, 1, T, T]`` mask makes it compute every query-key pair of the row and mask most of them away; this
function instead runs SDPA with ``is_causal=True`` on each sample's own span, so the work is the sum of the
samples' causal triangles. Padding after a row's samples (positions all 0) is one span too: its outputs feed
no real token and no loss.

It is used when the model's ``attn_implementation`` is ``sdpa`` (``toollmm.model.llm`` registers it under
``PACKED_SDPA``) and the call is a training / prefill pass with no mask, ``position_ids`` given and as many
keys as queries. Every other call (padding masks, decoding with a KV cache) goes to transformers' own
``sdpa_attention_forward`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_SDPA = "toollmm_packed_sdpa"


def spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, ``(start, end)`` of each sample: a span starts where the position is 0; a run of length-1
    spans (padding, every position 0) becomes one span."""
    t = position_ids.shape[1]
    out = []
    for row in (position_ids == 0).tolist():
        starts = [i for i, z in enumerate(row) if z]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        merged: list[tuple[int, int]] = []
        ones = False
        for s, e in zip(starts, starts[1:] + [t]):
            if e - s == 1 and ones:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
                ones = e - s == 1
        out.append(merged)
    return out


def packed_sdpa_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs
):
    """The attention-function signature of ``transformers.AttentionInterface`` (see the module docstring)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or position_ids is None or q_len == 1 or q_len != kv_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for b, row in enumerate(spans(position_ids)):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
            )
            for s, e in row
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function (and the 'no mask needed' mask rule) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args, attention_mask=None, **kwargs):
        # no padding mask: spans come from position_ids; a padding mask: the ordinary SDPA mask
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, mask)
    return PACKED_SDPA
