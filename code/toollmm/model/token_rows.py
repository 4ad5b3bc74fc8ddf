"""Trainable rows for the new tokens only, in the input embedding and the lm_head.

The base matrices stay frozen ``weight`` parameters (so Hugging Face tying, resizing checks and
``get_input_embeddings().weight`` keep working); each group of new tokens (``placeholder``, ``signal``,
``tool``; see ``toollmm.core.tokens``) gets its own small ``[n_group, hidden]`` parameter that overrides
the frozen rows at those ids. So ``requires_grad`` can be set per group (stage 2 trains signal rows,
stage 3 signal + tool rows), the optimiser never holds state for the base vocabulary, the base rows
stay bit-identical, and a delta saves ``n_new x hidden`` numbers per matrix instead of a whole matrix.

Why not peft's Trainable Tokens (checked with peft 0.21.2): it covers both an untied lm_head and tied
embeddings, but it holds ONE delta per matrix for all indices (no per-group training without gradient
masking) and needs a different peft model when LoRA is disabled. These wrappers work the same with
LoRA on or off, and the LoRA adapter stays a plain peft adapter.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from toollmm.core.tokens import TokenIds

log = logging.getLogger(__name__)

ROW_GROUPS = ("placeholder", "signal", "tool")


class TokenRows(nn.Module):
    """Per-group row parameters plus the id bookkeeping to scatter them into a vocabulary."""

    def __init__(self, token_ids: TokenIds, init: torch.Tensor, vocab_size: int):
        super().__init__()
        ids_by_group = {g: token_ids.group_ids(g) for g in ROW_GROUPS}
        order = [i for g in ROW_GROUPS for i in ids_by_group[g]]
        if max(order) >= vocab_size:
            raise ValueError(f"token id {max(order)} outside a vocabulary of {vocab_size} rows")
        self.group_sizes = {g: len(ids_by_group[g]) for g in ROW_GROUPS}
        self.group_ids = ids_by_group
        self.rows = nn.ParameterDict()
        start = 0
        for g in ROW_GROUPS:
            n = self.group_sizes[g]
            self.rows[g] = nn.Parameter(init[start : start + n].clone(), requires_grad=False)
            start += n
        device = init.device
        self.register_buffer("ids", torch.tensor(order, dtype=torch.long, device=device), persistent=False)
        slot = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        if not slot.is_meta:
            slot[self.ids] = torch.arange(len(order), device=device)
        self.register_buffer("slot", slot, persistent=False)

    def matrix(self) -> torch.Tensor:
        """All new rows ``[n_new, hidden]`` in ``self.ids`` order."""
        return torch.cat([self.rows[g] for g in ROW_GROUPS], dim=0)


class RowEmbedding(nn.Embedding):
    """``nn.Embedding`` whose rows at the new ids come from a :class:`TokenRows`."""

    def __init__(self, base: nn.Embedding, token_rows: TokenRows):
        nn.Module.__init__(self)  # reuse base's weight instead of allocating a new matrix
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type"):
            setattr(self, attr, getattr(base, attr))
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight
        self.token_rows = token_rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(input_ids, self.weight, self.padding_idx)
        slot = self.token_rows.slot[input_ids]
        new = F.embedding(slot.clamp(min=0), self.token_rows.matrix())
        return torch.where((slot >= 0).unsqueeze(-1), new.to(out.dtype), out)


class RowLMHead(nn.Linear):
    """``nn.Linear`` lm_head whose output columns at the new ids come from a :class:`TokenRows`."""

    def __init__(self, base: nn.Linear, token_rows: TokenRows):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.token_rows = token_rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)
        rows = self.token_rows.matrix()
        new = F.linear(hidden, rows.to(hidden.dtype))
        if self.bias is not None:
            new = new + self.bias[self.token_rows.ids]
        return logits.index_copy(logits.dim() - 1, self.token_rows.ids, new.to(logits.dtype))


def _mean_init(
    weight: torch.Tensor, new_ids: list[int], noise_std: float, gen: torch.Generator
) -> torch.Tensor:
    """Mean of the existing rows plus N(0, (noise_std * per-dim std of the existing rows)^2) noise."""
    n, h = len(new_ids), weight.shape[1]
    if weight.is_meta:
        return torch.empty(n, h, device="meta", dtype=weight.dtype)
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[new_ids] = False
    with torch.no_grad():
        base = weight[keep].float()
        std, mean = torch.std_mean(base, dim=0)
        noise = torch.randn(n, h, generator=gen).to(weight.device)
        return (mean + noise * (noise_std * std)).to(weight.dtype)


def attach_token_rows(
    model, token_ids: TokenIds, noise_std: float, seed: int, keep_existing: bool = False
) -> dict[str, TokenRows]:
    """Resize ``model`` (a HF causal LM) to hold ``token_ids``, initialise the new rows and wrap the
    embedding and lm_head so that only per-group row parameters can train. Returns ``{"embed": rows,
    "head": rows}`` (the same object twice when the embeddings are tied). ``keep_existing``: the base
    was trained with these tokens already; their rows start from the base matrices' values."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(emb, RowEmbedding):
        raise ValueError("token rows are already attached to this model")
    if type(emb) is not nn.Embedding or (head is not None and type(head) is not nn.Linear):
        raise NotImplementedError(
            f"token rows support nn.Embedding + nn.Linear heads; this model has "
            f"{type(emb).__name__} and {type(head).__name__}"
        )
    needed = max(token_ids.new_ids) + 1
    if emb.weight.shape[0] < needed:
        model.resize_token_embeddings(needed, mean_resizing=False)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    new_ids = [i for g in ROW_GROUPS for i in token_ids.group_ids(g)]
    gen = torch.Generator().manual_seed(seed)
    vocab = emb.weight.shape[0]

    def init(weight: torch.Tensor) -> torch.Tensor:
        if keep_existing and not weight.is_meta:
            return weight.detach()[new_ids].clone()
        return _mean_init(weight, new_ids, noise_std, gen)

    embed_rows = TokenRows(token_ids, init(emb.weight), vocab)
    _write_rows(emb.weight, embed_rows)
    model.set_input_embeddings(RowEmbedding(emb, embed_rows))
    out = {"embed": embed_rows, "head": embed_rows}
    if head is not None:
        head_rows = embed_rows if tied else TokenRows(token_ids, init(head.weight), vocab)
        _write_rows(head.weight, head_rows)
        model.set_output_embeddings(RowLMHead(head, head_rows))
        out["head"] = head_rows
    log.info("token rows: %d new ids, %s embeddings", len(new_ids), "tied" if tied else "untied")
    return out


def _write_rows(weight: torch.Tensor, token_rows: TokenRows) -> None:
    """Keep the frozen matrix's rows at the new ids equal to the row parameters' initial values
    (they are never read, but a full-model save then shows the same numbers)."""
    if not weight.is_meta:
        with torch.no_grad():
            weight[token_rows.ids] = token_rows.matrix().to(weight.dtype)
