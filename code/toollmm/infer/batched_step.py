"""A ``StepModel`` that decodes all rows of a batch in ONE forward per step (what the server uses).

``ToolLMMStepModel`` keeps one KV cache per row and runs one forward per active row per step: exact, but a
batch of 8 costs 8 forwards. Here each row is embedded on its own (its media written at its placeholders,
exactly as ``ToolLMMStepModel.start`` does), the rows are left-padded to the longest prompt and prefilled in
one forward into one batched cache, each row in its own cache rows. Every step appends, per row, the
tokens the engine gives it (a sampled token, a forced chunk, or nothing) padded to the step's longest
append; a 2-D attention mask marks every padding slot, old and new, so a row only ever attends to its own
real tokens, and ``position_ids`` count each row's real tokens, so its rotary positions are those of the
row decoded alone. A row's logits and hidden states therefore do not depend on its batch-mates beyond
floating-point summation order (the server's test checks greedy tokens alone vs inside a batch of 8).

The explicit mask also keeps multi-token appends off the mask-less SDPA path (``is_causal`` with fewer
queries than keys), for every ``attn_implementation``.

Continuous batching (the server's loop, ``serve/batcher.py``): ``join`` prefills new rows on their own and
appends them to a running batch (the shorter side's cache and mask left-padded with masked slots, so no row
sees anything new), ``leave`` drops finished rows and the cache columns no remaining row uses. Cached keys
already carry their rotary positions, so padding in front of them changes nothing a row attends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..agent.protocol import StepOutput
from .step import RowEmbedder


@dataclass
class _Batch:
    cache: object  # transformers DynamicCache, batch dimension = rows
    mask: torch.Tensor  # [B, cache_len] 1 = a real token of that row
    lengths: list[int]  # real tokens per row (the next position id)


class BatchedStepModel(RowEmbedder):
    @torch.no_grad()
    def start(self, prompts: list[list[int]], media=None) -> tuple[_Batch, StepOutput]:
        """Each row embedded on its own (its media written at its placeholders, as in training), the
        embeddings left-padded into one batch and prefilled in one forward."""
        rows = [self._embed(ids, row_media)[0] for ids, row_media in self._rows(prompts, media)]
        lengths = [len(p) for p in prompts]
        b, longest = len(prompts), max(lengths)
        x = rows[0].new_zeros(b, longest, rows[0].shape[-1])
        mask = torch.zeros(b, longest, dtype=torch.long, device=self.device)
        pos = torch.zeros(b, longest, dtype=torch.long, device=self.device)
        for i, (e, n) in enumerate(zip(rows, lengths)):
            x[i, longest - n :] = e
            mask[i, longest - n :] = 1
            pos[i, longest - n :] = torch.arange(n, device=self.device)
        out = self.llm(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            output_hidden_states=True,
        )
        last = out.hidden_states[-1]
        hidden = [last[i, longest - n :] for i, n in enumerate(lengths)]
        return _Batch(out.past_key_values, mask, lengths), StepOutput(out.logits[:, -1].float(), hidden)

    @torch.no_grad()
    def join(self, state: _Batch, prompts: list[list[int]], media=None) -> StepOutput:
        """Prefill ``prompts`` (each row on its own, as ``start``) and append them as the last rows of the
        running ``state``; returns the new rows' logits and prompt hidden states. ``state`` is only
        changed once the prefill succeeded (a prompt that breaks the model leaves the batch as it was)."""
        new, out = self.start(prompts, media)
        old_len, new_len = state.mask.shape[1], new.mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(state.cache.layers, new.cache.layers):
            for name in ("keys", "values"):
                a, b = (
                    _pad_left(getattr(old_layer, name), width, 2),
                    _pad_left(getattr(new_layer, name), width, 2),
                )
                setattr(old_layer, name, torch.cat([a, b], dim=0))
        state.mask = torch.cat([_pad_left(state.mask, width, 1), _pad_left(new.mask, width, 1)], dim=0)
        state.lengths.extend(new.lengths)
        return out

    def leave(self, state: _Batch, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in that order); cache columns no kept row uses are dropped."""
        if not keep:
            raise ValueError("leave: keep at least one row (start a new batch instead)")
        idx = torch.tensor(keep, dtype=torch.long, device=state.mask.device)
        mask = state.mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        for layer in state.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        state.mask = mask[:, first:]
        state.lengths = [state.lengths[i] for i in keep]

    @torch.no_grad()
    def step(self, state: _Batch, tokens: list[list[int]]) -> StepOutput:
        emb = self.llm.get_input_embeddings()
        b, width = len(tokens), max((len(t) for t in tokens), default=0)
        if width == 0:
            return StepOutput(torch.zeros(b, emb.num_embeddings), [None] * b)
        # built in one go (no per-row tensor ops): ids padded with 0, padding masked, each row's positions
        # counting its own real tokens (a padding slot repeats the row's last position; it is masked)
        n = torch.tensor([len(t) for t in tokens], dtype=torch.long)
        ids = torch.tensor([list(t) + [0] * (width - len(t)) for t in tokens], dtype=torch.long)
        steps = torch.arange(width)
        new_mask = (steps[None, :] < n[:, None]).long()
        start = torch.tensor(state.lengths, dtype=torch.long)
        pos = start[:, None] + torch.minimum(steps[None, :], (n.clamp(min=1) - 1)[:, None])
        mask = torch.cat([state.mask, new_mask.to(self.device)], dim=1)
        out = self.llm(
            inputs_embeds=emb(ids.to(self.device)),
            attention_mask=mask,
            position_ids=pos.to(self.device),
            past_key_values=state.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        state.cache, state.mask = out.past_key_values, mask
        last = out.hidden_states[-1]
        # each row's logits at its last appended token; a row that appended nothing gets zeros
        rows = torch.arange(b, device=out.logits.device)
        lg = out.logits[rows, (n.clamp(min=1) - 1).to(out.logits.device)].float().cpu()
        logits = torch.zeros(b, emb.num_embeddings)
        logits[:, : lg.shape[-1]] = lg
        logits[n == 0] = 0.0
        hidden: list[torch.Tensor | None] = []
        for i, toks in enumerate(tokens):
            k = len(toks)
            state.lengths[i] += k
            hidden.append(last[i, :k] if k else None)
        return StepOutput(logits, hidden)


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x`` with zeros in front along ``dim`` up to ``width`` (masked slots)."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
