"""The batch contract between the data pipeline (renderer + collator) and the model.

Media tokens. The renderer expands each ``<image>/<video>/<audio>`` placeholder into exactly
``media_tokens[modality]`` copies of that placeholder's token id (``toollmm.core.tokens``), where
``media_tokens[m] = encoder outputs per input (1 when pooled, clips when per-clip) * input_proj.tokens_per_input``.
So sequence lengths are final before the model runs (length grouping, packing and the max-length check
all see real lengths), and the model writes projected encoder tokens at exactly those positions.

Ordering. Media of one modality are listed in row-major order of their placeholder runs in
``input_ids`` (row 0 left to right, then row 1 ...), which is also the order of boolean-mask indexing
``input_ids == placeholder_id``. Signal spans likewise.

Packing. With packing, one row holds several samples: ``position_ids`` restart at 0 for each sample
and ``attention_mask`` is a 4-D boolean ``[B, 1, T, T]`` block-diagonal causal mask (True = attend),
so attention never crosses samples. Without packing ``attention_mask`` is the usual ``[B, T]`` 0/1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

IGNORE_INDEX = -100


@dataclass
class MediaInputs:
    """All media of one modality in a batch, in placeholder order.

    Exactly one of ``features`` (cached encoder outputs, ``[N, n_out, D_enc]``; ``n_out`` = 1 when pooled)
    and ``pixels`` (preprocessed encoder input, e.g. image ``[N, 3, 224, 224]``, audio ``[N, clips, 1, 128, 204]``,
    video ``[N, clips*crops, 3, frames, 224, 224]``) is set.
    """

    features: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)  # feature-cache keys / record ids, for error messages

    def __len__(self) -> int:
        t = self.features if self.features is not None else self.pixels
        return 0 if t is None else int(t.shape[0])


@dataclass
class SignalTargets:
    """Supervised signal spans of one modality, for the L2 alignment loss.

    ``positions[k] = (row, start)``: the span's first signal token is ``input_ids[row, start]`` and the
    span has the contract's full length. ``embeddings[k]`` is the decoder text-encoder embedding of the
    caption the span must produce, shape ``[K, n_query, cond_dim]`` (SD v1.5: 77 x 768).
    """

    positions: torch.Tensor  # long [K, 2]
    embeddings: torch.Tensor  # float [K, n_query, cond_dim]


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, T]
    labels: torch.Tensor  # long [B, T], IGNORE_INDEX where not supervised (unshifted; the model shifts)
    attention_mask: torch.Tensor  # [B, T] 0/1, or bool [B, 1, T, T] when packed
    position_ids: torch.Tensor | None = None  # long [B, T]; restarts per sample when packed
    media: dict[str, MediaInputs] = field(default_factory=dict)  # modality -> inputs
    signal_targets: dict[str, SignalTargets] = field(default_factory=dict)  # modality -> targets
    sample_ids: list[list[str]] = field(default_factory=list)  # per row: the record ids it holds
    real_tokens: int = 0  # non-padding tokens in the batch (for real tokens/s and the real-token fraction)

    @property
    def real_token_fraction(self) -> float:
        return self.real_tokens / max(1, self.input_ids.numel())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move tensors; floating media are cast to ``dtype`` when given (bf16 on GPU); the caption
        embeddings of ``signal_targets`` keep their own dtype (loss targets, compared in float32)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.to(device, non_blocking=True)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        out = Batch(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.input_ids = mv(self.input_ids)
        out.labels = mv(self.labels)
        out.attention_mask = self.attention_mask.to(device)
        out.position_ids = mv(self.position_ids)
        out.media = {
            m: MediaInputs(mv(v.features), mv(v.pixels), list(v.keys)) for m, v in self.media.items()
        }
        # loss targets keep their precision (float32): the L2 loss compares against them in float32
        out.signal_targets = {
            m: SignalTargets(mv(v.positions), v.embeddings.to(device, non_blocking=True))
            for m, v in self.signal_targets.items()
        }
        return out
