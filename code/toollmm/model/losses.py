"""Loss terms and the attention-mask plumbing of the composed model (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toollmm.core.batch import IGNORE_INDEX

from .packed_attention import PACKED_SDPA

LOSS_WEIGHT_KEYS = ("lm", "align", "align_image", "align_video", "align_audio")


def check_loss_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """``train.loss_weights``: ``lm``, ``align`` (every modality) and ``align_<modality>`` (overrides)."""
    weights = dict(weights or {})
    bad = sorted(k for k in weights if k not in LOSS_WEIGHT_KEYS)
    if bad:
        raise ValueError(f"train.loss_weights: unknown key(s) {bad}; known: {list(LOSS_WEIGHT_KEYS)}")
    return weights


def align_weight(weights: dict[str, float], modality: str) -> float:
    return float(weights.get(f"align_{modality}", weights.get("align", 1.0)))


def prepare_attention_mask(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """The batch's mask in the form the attention kernel takes.

    2-D ``[B, T]`` padding masks pass through. A packed 4-D boolean ``[B, 1, T, T]`` mask (True = attend)
    first gets its diagonal set, so padding positions attend to themselves instead of to nothing (some
    attention kernels return NaN for a fully masked row, and NaN * 0 still poisons gradients); real tokens
    already attend to themselves, so their outputs do not change. Then: sdpa and others take the boolean mask, eager an
    additive float mask; flash_attention_2 and ``PACKED_SDPA`` (``toollmm.model.packed_attention``, what
    ``sdpa`` loads as) take no mask: ``ToolLMM.run_llm`` hands them the sample boundaries, found once per
    batch by ``packed_attention_kwargs``.
    """
    if mask.dim() == 2:
        return mask
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        raise ValueError(f"attention_mask must be [B, T] or [B, 1, T, T], got {tuple(mask.shape)}")
    if attn_implementation in ("flash_attention_2", PACKED_SDPA):
        return None
    t = mask.shape[-1]
    m = mask.bool() | torch.eye(t, dtype=torch.bool, device=mask.device)
    if attn_implementation == "eager":
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
    return m


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, sample_starts: torch.Tensor | None = None):
    """Token-mean next-token cross-entropy over supervised labels (computed in float32).

    ``sample_starts`` (bool ``[B, T]``, packed rows): a label at a sample's first position is never
    predicted from the previous sample's last token. No supervised token -> an exact 0 that still
    has a graph (never NaN).
    """
    shift_labels = labels[:, 1:]
    if sample_starts is not None:
        shift_labels = shift_labels.masked_fill(sample_starts[:, 1:], IGNORE_INDEX)
    shift_logits = logits[:, :-1].float()
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    n = (shift_labels != IGNORE_INDEX).sum()
    return total / n.clamp(min=1)


def next_token_targets(
    labels: torch.Tensor, sample_starts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep [B, T] bool, targets [N])``: the positions whose next token is supervised and those tokens,
    in row-major order (what ``hidden[keep]`` yields). The loss reads logits only there, so the LM head
    (for a 32k vocabulary about a third of a 100M model's FLOPs) runs only there."""
    nxt = labels[:, 1:]
    if sample_starts is not None:
        nxt = nxt.masked_fill(sample_starts[:, 1:], IGNORE_INDEX)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = nxt != IGNORE_INDEX
    return keep, nxt[keep[:, :-1]]


def lm_loss_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``lm_loss`` on logits already gathered at the supervised positions (``[N, V]``, ``[N]``); the same
    token mean, and an exact 0 with a graph when ``N == 0``."""
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return total / max(1, targets.shape[0])


def l2_alignment(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NExT-GPT's alignment loss: Euclidean distance per conditioning token, averaged over tokens."""
    return torch.linalg.vector_norm(pred.float() - target.float(), dim=-1).mean()
