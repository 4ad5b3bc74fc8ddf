"""The small model protocol the decode engine drives (the real multimodal model implements it later).

KV-cache semantics: ``start`` prefills the prompts, ``step`` APPENDS tokens to each row and returns the
next-token logits after the last appended token. Rows may append different numbers of tokens in one
step (a sampled token, a forced chunk such as a tool result, or nothing once finished); a model that can
only take one token per row per step sets ``max_append = 1`` and the engine feeds forced chunks token by
token. ``hidden`` (optional) carries the last-layer hidden states of the tokens just appended, which the
signal hook receives for a completed ``[IMG0]..[IMGn]`` span (the output projection's input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, V] next-token logits per row (ignored for rows that appended nothing)
    hidden: list[torch.Tensor | None] | None = None  # per row [n_appended, H], or None


@runtime_checkable
class StepModel(Protocol):
    def start(self, prompts: list[list[int]], media: Any = None) -> tuple[Any, StepOutput]:
        """Prefill ``prompts`` (token ids, media placeholders included) with ``media``; logits after each."""
        ...

    def step(self, state: Any, tokens: list[list[int]]) -> StepOutput:
        """Append ``tokens[row]`` (possibly empty) to each row; logits after each row's last token."""
        ...


class SignalHook(Protocol):
    def __call__(
        self, *, row: int, modality: str, positions: list[int], hidden: torch.Tensor | None, state: Any
    ) -> Any:
        """A complete signal span: ``positions`` index the row's full sequence (prompt + generated);
        ``hidden`` is ``[span_len, H]`` when the model returns hidden states. Returns e.g. a file path."""
        ...
