"""Per-row decode state (internal) and what a finished row reports (``RowResult``, ``SignalEvent``)."""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .spec import ToolResult


@dataclass
class SignalEvent:
    modality: str
    positions: list[int]  # in the row's full sequence (prompt + generated)
    forced: bool  # completed by the engine (partial_signal: complete)
    result: Any = None  # what the hook returned (e.g. a file path)
    error: str | None = None


@dataclass
class RowResult:
    text: str  # what the user sees: tool-call / tool-result spans and special tokens removed
    raw_text: str  # everything generated or forced, special tokens kept
    token_ids: list[int]
    tool_results: list[ToolResult]
    signals: list[SignalEvent]
    errors: list[str]
    warnings: list[str]
    finish_reason: (
        str  # eos | stop_string | max_new_tokens | tool_limit | runaway | tool_call | cancelled | error
    )
    timings: dict[str, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Span:
    modality: str
    ids: list[int]
    positions: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor | None] = field(default_factory=list)
    forced: bool = False


@dataclass
class RowState:
    index: int
    prompt_len: int
    stop_at_call: bool = False  # end the row after its first tool call, without running it
    gen: list[int] = field(default_factory=list)
    pending: deque = field(default_factory=deque)  # (token, span or None)
    mode: str = "text"
    span: Span | None = None
    wanted: dict[int, Span] = field(default_factory=dict)  # position -> span awaiting its hidden state
    call_ids: list[int] = field(default_factory=list)
    segment_start: int = 0
    free_start: int = 0  # gen index after the last forced token: where the model's own text starts
    stop_string: str | None = None  # the stop string that ended the row
    sampled: int = 0
    tool_steps: int = 0
    call_counts: Counter = field(default_factory=Counter)
    stop_after_pending: str | None = None
    finish_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    signals: list[SignalEvent] = field(default_factory=list)
    first_token_s: float | None = None
    total_s: float = 0.0
    # per-row options (``engine.RowOptions``)
    max_new_tokens: int = 0
    sampler: Any = None  # None: the engine's shared sampler
    prefix: deque = field(default_factory=deque)
    stop: tuple = ()
    cancelled: Any = None
