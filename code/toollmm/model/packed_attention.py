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
``sdpa_attention_forward``; an append of several tokens to a cache with no mask gets an explicit causal mask
aligned to the END of the keys (transformers' ``is_causal`` path would crop the keys to the first ``q_len``
positions and read the wrong history).

Sample spans are found once per batch (:func:`packed_attention_kwargs`, one host sync), not once per layer:
``ToolLMM.run_llm`` passes them to every layer as the ``toollmm_spans`` keyword (``PACKED_SDPA``) or as
``cu_seq_lens_q/k`` + ``max_length_q/k`` over the flattened rows (``flash_attention_2``, whose own
``position_ids`` detection only works for a single row).
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


def cu_seqlens(rows: list[list[tuple[int, int]]], width: int) -> list[int]:
    """Cumulative sample boundaries over the rows flattened to one sequence (row ``r`` starts at ``r * width``)."""
    out = [r * width + s for r, row in enumerate(rows) for s, _ in row]
    return out + [len(rows) * width]


def packed_attention_kwargs(attn_implementation: str, position_ids: torch.Tensor) -> dict:
    """The per-batch keywords that keep attention inside each packed sample (computed once per batch):
    ``toollmm_spans`` for ``PACKED_SDPA``; ``cu_seq_lens_q/k`` (int32, on the positions' device) and
    ``max_length_q/k`` for ``flash_attention_2``; nothing for kernels that read the 4-D mask (eager)."""
    if attn_implementation not in (PACKED_SDPA, "flash_attention_2"):
        return {}
    rows = spans(position_ids)
    if attn_implementation == PACKED_SDPA:
        return {"toollmm_spans": rows}
    cu = torch.tensor(cu_seqlens(rows, position_ids.shape[1]), dtype=torch.int32, device=position_ids.device)
    longest = max(e - s for row in rows for s, e in row)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def append_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool ``[1, 1, q_len, kv_len]``: the last ``q_len`` keys are the queries themselves (a cache append),
    query ``i`` sees every cached key and the new keys up to itself."""
    q = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return (torch.arange(kv_len, device=device)[None, :] <= q)[None, None]


def packed_sdpa_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs
):
    """The attention-function signature of ``transformers.AttentionInterface`` (see the module docstring)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    rows_spans = kwargs.pop("toollmm_spans", None)
    position_ids = kwargs.get("position_ids")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and 1 < q_len < kv_len:  # several tokens appended to a cache
        attention_mask = append_mask(q_len, kv_len, query.device)
    if (
        attention_mask is not None
        or q_len == 1
        or q_len != kv_len
        or (position_ids is None and rows_spans is None)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if rows_spans is None:
        if position_ids.shape[0] != query.shape[0]:
            position_ids = position_ids.expand(query.shape[0], -1)
        rows_spans = spans(position_ids)
    if len(rows_spans) != query.shape[0]:
        raise ValueError(f"toollmm_spans: {len(rows_spans)} rows of spans for a batch of {query.shape[0]}")
    rows = []
    for b, row in enumerate(rows_spans):
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
