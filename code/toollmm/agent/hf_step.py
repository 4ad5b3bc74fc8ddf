"""A reference ``StepModel`` over any Hugging Face causal LM (text only): one KV cache per row.

Each row keeps its own ``past_key_values``, so ragged appends (one sampled token in one row, a forced
tool result in another, nothing in a finished row) are exact without padding tricks; the cost is one
forward per active row per step. It shows the protocol on a real KV cache (tests check it against a
full forward and against ``generate``) and serves text-only checkpoints; the multimodal model
implements the same two methods with its media-aware prefill.
"""

from __future__ import annotations

from typing import Any

import torch

from .protocol import StepOutput


class CausalLMStepModel:
    max_append = None  # any number of tokens per row per step

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def _forward(self, ids: list[int], cache) -> tuple[torch.Tensor, torch.Tensor, Any]:
        device = next(self.model.parameters()).device
        out = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        return out.logits[0, -1].float(), out.hidden_states[-1][0], out.past_key_values

    def start(self, prompts: list[list[int]], media: Any = None) -> tuple[list, StepOutput]:
        if media:
            raise ValueError("CausalLMStepModel is text-only; media needs the multimodal model")
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        caches, logits, hidden = [], [], []
        for p in prompts:
            lg, hs, cache = self._forward(list(p), None)
            caches.append(cache)
            logits.append(lg)
            hidden.append(hs)
        return caches, StepOutput(torch.stack(logits), hidden)

    def step(self, state: list, tokens: list[list[int]]) -> StepOutput:
        vocab = self.model.config.vocab_size
        logits = torch.zeros(len(tokens), vocab)
        hidden: list[torch.Tensor | None] = []
        for i, toks in enumerate(tokens):
            if not toks:
                hidden.append(None)
                continue
            lg, hs, state[i] = self._forward(list(toks), state[i])
            logits[i, : lg.numel()] = lg.cpu()
            hidden.append(hs)
        return StepOutput(logits, hidden)
