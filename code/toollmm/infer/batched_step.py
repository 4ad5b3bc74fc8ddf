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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toollmm.core.batch import Batch

from ..agent.protocol import StepOutput


@dataclass
class _Batch:
    cache: object  # transformers DynamicCache, batch dimension = rows
    mask: torch.Tensor  # [B, cache_len] 1 = a real token of that row
    lengths: list[int]  # real tokens per row (the next position id)


class BatchedStepModel:
    max_append = None  # any number of tokens per row per step

    def __init__(self, model):
        self.model = model.eval()
        self.llm = model.llm
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def start(self, prompts: list[list[int]], media=None) -> tuple[_Batch, StepOutput]:
        """Each row embedded on its own (its media written at its placeholders, as in training), the
        embeddings left-padded into one batch and prefilled in one forward."""
        media = media or [{} for _ in prompts]
        if len(media) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but media for {len(media)} rows")
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        rows = []
        for ids, row_media in zip(prompts, media):
            t = torch.tensor([ids], dtype=torch.long, device=self.device)
            batch = Batch(t, torch.full_like(t, -100), torch.ones_like(t), media=dict(row_media or {}))
            rows.append(self.model.embed(batch.to(self.device))[0])
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
    def step(self, state: _Batch, tokens: list[list[int]]) -> StepOutput:
        emb = self.llm.get_input_embeddings()
        b, width = len(tokens), max((len(t) for t in tokens), default=0)
        logits = torch.zeros(b, emb.num_embeddings)
        if width == 0:
            return StepOutput(logits, [None] * b)
        ids = torch.zeros(b, width, dtype=torch.long)
        new_mask = torch.zeros(b, width, dtype=torch.long)
        pos = torch.zeros(b, width, dtype=torch.long)
        for i, toks in enumerate(tokens):
            n, start = len(toks), state.lengths[i]
            if n:
                ids[i, :n] = torch.tensor(toks, dtype=torch.long)
                new_mask[i, :n] = 1
            pos[i] = torch.arange(start, start + width).clamp(max=start + max(n, 1) - 1)
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
        hidden: list[torch.Tensor | None] = []
        for i, toks in enumerate(tokens):
            n = len(toks)
            if not n:
                hidden.append(None)
                continue
            state.lengths[i] += n
            lg = out.logits[i, n - 1].float()
            logits[i, : lg.numel()] = lg.cpu()
            hidden.append(last[i, :n])
        return StepOutput(logits, hidden)
