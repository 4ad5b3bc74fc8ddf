"""flash-attn's two kernel entry points, written out in plain torch, for running ``flash_attention_2`` on CPU.

flash-attn needs CUDA, so on CPU the tests install these as the LAST step of transformers' FA2 path
(``modeling_flash_attention_utils``'s loaded kernel functions): everything before the kernel call — our
``cu_seq_lens_*`` keywords, transformers' argument processing, the unpad / varlen / dense dispatch — is the
real code, and every call's arguments are recorded. The semantics are flash-attn >= 2.1's: heads may be
grouped (GQA), ``causal`` aligns the mask to the bottom-right corner (query ``i`` of ``Lq`` sees keys up to
``i + Lk - Lq``), ``cu_seqlens`` delimit independent sequences of the flattened tokens.
"""

from __future__ import annotations

import math

import torch


def _attend(q, k, v, scale, causal):
    """q ``[Lq, H, D]``, k / v ``[Lk, Hk, D]`` -> ``[Lq, H, D]``."""
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float()).to(q.dtype)


class FlashReference:
    """``flash_attn_func`` / ``flash_attn_varlen_func`` with flash-attn's signatures; ``calls`` records them."""

    def __init__(self):
        self.calls: list[dict] = []

    def flash_attn_func(
        self,
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
    ):
        self.calls.append({"fn": "dense", "q": tuple(q.shape), "k": tuple(k.shape), "causal": causal})
        return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])

    def flash_attn_varlen_func(
        self,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        block_table=None,
    ):
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        self.calls.append(
            {
                "fn": "varlen",
                "q": tuple(q.shape),
                "cu_seqlens_q": cq,
                "cu_seqlens_k": ck,
                "cu_dtype": cu_seqlens_q.dtype,
                "max_seqlen_q": max_seqlen_q,
                "max_seqlen_k": max_seqlen_k,
                "causal": causal,
            }
        )
        parts = [
            _attend(q[a:b], k[c:d], v[c:d], softmax_scale, causal)
            for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])
        ]
        return torch.cat(parts)


def install(monkeypatch) -> FlashReference:
    """Make transformers' FA2 path call a :class:`FlashReference` as its kernel (undone by ``monkeypatch``)."""
    import transformers.modeling_flash_attention_utils as fa

    ref = FlashReference()
    monkeypatch.setattr(fa, "_loaded_implementation", "flash_attention_2")
    monkeypatch.setattr(fa, "_flash_fn", ref.flash_attn_func)
    monkeypatch.setattr(fa, "_flash_varlen_fn", ref.flash_attn_varlen_func)
    monkeypatch.setattr(fa, "_flash_with_kvcache_fn", None)
    monkeypatch.setattr(fa, "_pad_fn", fa._pad_input)
    monkeypatch.setattr(fa, "_unpad_fn", fa._unpad_input)
    monkeypatch.setattr(
        fa, "_process_flash_kwargs_fn", fa._lazy_define_process_function(ref.flash_attn_varlen_func)
    )
    monkeypatch.setattr(fa, "_process_with_kvcache_kwargs_fn", dict)
    return ref


def as_flash_attention_2(model) -> None:
    """Switch a built ``ToolLMM`` (loaded with another kernel on CPU, where flash-attn cannot load) to
    ``flash_attention_2``: the config every attention layer reads at call time, and the bundle's record."""
    model.bundle.hf_model.config._attn_implementation = "flash_attention_2"
    model.bundle.attn_implementation = "flash_attention_2"
