"""Next-token choice: banned ids masked, then greedy or temperature + top-p with a seeded generator."""

from __future__ import annotations

import torch


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, banned: list[int] = ()):
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(
                f"sampling: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}"
            )
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator().manual_seed(seed)
        self.banned = torch.tensor(sorted(set(banned)), dtype=torch.long)

    def __call__(self, logits: torch.Tensor) -> int | None:
        """One row's ``[V]`` logits -> a token id, or None when no token can be chosen (NaN / all banned)."""
        x = logits.detach().float().cpu()
        if self.temperature == 0:  # greedy, one pass: the same token as the full path below
            if self.banned.numel():
                x = x.index_fill(0, self.banned[self.banned < x.numel()], float("-inf"))
            i = int(torch.argmax(x))  # argmax lands on a NaN if there is one
            best = float(x[i])
            if best == best and best != float("-inf"):  # not NaN, not all banned / -inf
                return i
        x = x.clone()
        if torch.isnan(x).any():
            return None
        if self.banned.numel():
            x[self.banned[self.banned < x.numel()]] = float("-inf")
        if not torch.isfinite(x).any():
            return None
        x = torch.nan_to_num(x, posinf=torch.finfo(x.dtype).max)
        if self.temperature == 0:
            return int(torch.argmax(x))
        probs = torch.softmax(x / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < self.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))
