"""The composed model behind the decode engine's ``StepModel`` protocol (``toollmm.agent.protocol``).

``start`` prefills each prompt with its media written at the placeholder positions (exactly as in
training: ``ToolLMM.embed``), ``step`` appends tokens through the KV cache. One cache per row keeps
ragged appends (a sampled token here, a forced tool result there) exact without padding tricks.
:func:`project_signal` turns a completed signal span's hidden states into decoder conditioning the way
training does (hidden + input embeddings of the signal tokens -> output projection).
"""

from __future__ import annotations

from typing import Any

import torch

from toollmm.core.batch import Batch, MediaInputs

from ..agent.protocol import StepOutput


class RowEmbedder:
    """What both step models share: the model in eval mode, its LLM and device, the prompts checked, and
    a prompt's embeddings with its media written at its placeholders (exactly as training's ``ToolLMM.embed``)."""

    max_append = None  # any number of tokens per row per step

    def __init__(self, model):
        self.model = model.eval()
        self.llm = model.llm
        self.device = next(model.parameters()).device

    @staticmethod
    def _rows(prompts: list[list[int]], media) -> list[tuple[list[int], dict]]:
        media = media or [{} for _ in prompts]
        if len(media) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but media for {len(media)} rows")
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        return [(ids, dict(m or {})) for ids, m in zip(prompts, media)]

    def _embed(self, ids: list[int], media: dict[str, MediaInputs]) -> torch.Tensor:
        """``[1, len(ids), hidden]``: the prompt's input embeddings, media at the placeholders."""
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        batch = Batch(t, torch.full_like(t, -100), torch.ones_like(t), media=media)
        return self.model.embed(batch.to(self.device))


class ToolLMMStepModel(RowEmbedder):
    def _run(self, embeds: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor, Any]:
        out = self.llm(inputs_embeds=embeds, past_key_values=cache, use_cache=True, output_hidden_states=True)
        return out.logits[0, -1].float(), out.hidden_states[-1][0], out.past_key_values

    @torch.no_grad()
    def start(self, prompts: list[list[int]], media: list[dict[str, MediaInputs]] | None = None):
        """``media[row]``: that row's media per modality (cached features or pixels), in placeholder order."""
        caches, logits, hidden = [], [], []
        for ids, row_media in self._rows(prompts, media):
            lg, hs, cache = self._run(self._embed(ids, row_media), None)
            caches.append(cache)
            logits.append(lg)
            hidden.append(hs)
        return caches, StepOutput(torch.stack(logits), hidden)

    @torch.no_grad()
    def step(self, state: list, tokens: list[list[int]]) -> StepOutput:
        emb = self.llm.get_input_embeddings()
        logits = torch.zeros(len(tokens), emb.num_embeddings)
        hidden: list[torch.Tensor | None] = []
        for i, toks in enumerate(tokens):
            if not toks:
                hidden.append(None)
                continue
            ids = torch.tensor([toks], dtype=torch.long, device=self.device)
            lg, hs, state[i] = self._run(emb(ids), state[i])
            logits[i, : lg.numel()] = lg.cpu()
            hidden.append(hs)
        return StepOutput(logits, hidden)


@torch.no_grad()
def project_signal(model, modality: str, hidden: torch.Tensor) -> torch.Tensor:
    """``[span_len, H]`` last-layer hidden states of a complete span -> ``[n_query, cond_dim]``."""
    ids = torch.tensor(model.bundle.token_ids.signal[modality], device=hidden.device)
    if hidden.shape[0] != ids.numel():
        raise ValueError(
            f"{modality} span has {hidden.shape[0]} hidden states, the contract has {ids.numel()} tokens"
        )
    embeds = model.llm.get_input_embeddings()(ids)
    return model.output_proj[modality]((hidden + embeds.to(hidden.dtype)).unsqueeze(0))[0]
