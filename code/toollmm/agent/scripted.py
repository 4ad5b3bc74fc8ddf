"""A scripted ``StepModel``: it writes exactly chosen token sequences (engine tests, CLI/app tests, demos).

Each row has a script of token ids. The logits put all mass on the script's next token; a single
appended token that equals it advances the script. Forced tokens never do: a multi-token append is
forced by the engine (the model only ever proposes one token), and tokens between ``forced_brackets``
(e.g. ``<tool_result>`` .. ``</tool_result>``, for engines feeding one token per step) are skipped — so
the script "continues after" whatever the engine forced in. A banned choice replaced by another token
does not advance either. ``loop=True`` repeats a script forever (runaway tests).
Hidden states are ``[token_id, position, 0, ...]`` so tests can check what the signal hook receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .protocol import StepOutput


@dataclass
class ScriptState:
    seqs: list[list[int]]
    cursor: list[int]
    appended: list[list[int]] = field(default_factory=list)  # per row: every token appended after start
    inside: list[bool] = field(default_factory=list)  # per row: between forced_brackets


class ScriptedModel:
    def __init__(
        self,
        scripts: list[list[int]],
        vocab_size: int,
        eos_id: int,
        *,
        hidden_size: int = 4,
        loop: bool = False,
        max_append: int | None = None,
        nan_after: int | None = None,
        forced_brackets: tuple[int, int] | None = None,
    ):
        self.scripts = [list(s) for s in scripts]
        self.vocab_size, self.eos_id, self.hidden_size = vocab_size, eos_id, hidden_size
        self.loop = loop
        self.max_append = max_append
        self.nan_after = nan_after  # emit NaN logits once a row has appended this many tokens
        self.forced_brackets = forced_brackets
        self.calls = {"start": 0, "step": 0}
        self.last_state: ScriptState | None = None

    def _target(self, row: int, cursor: int) -> int:
        script = self.scripts[row]
        if not script:
            return self.eos_id
        if self.loop:
            return script[cursor % len(script)]
        return script[cursor] if cursor < len(script) else self.eos_id

    def _output(self, state: ScriptState, appended: list[list[int]]) -> StepOutput:
        logits = torch.zeros(len(state.seqs), self.vocab_size)
        hidden = []
        for i, toks in enumerate(appended):
            logits[i, self._target(i, state.cursor[i])] = 10.0
            if self.nan_after is not None and len(state.appended[i]) >= self.nan_after:
                logits[i] = float("nan")
            start = len(state.seqs[i]) - len(toks)
            h = torch.zeros(len(toks), self.hidden_size)
            for j, t in enumerate(toks):
                h[j, 0], h[j, 1] = float(t), float(start + j)
            hidden.append(h)
        return StepOutput(logits=logits, hidden=hidden)

    def start(self, prompts: list[list[int]], media=None) -> tuple[ScriptState, StepOutput]:
        if len(prompts) != len(self.scripts):
            raise ValueError(f"ScriptedModel has {len(self.scripts)} scripts but got {len(prompts)} prompts")
        self.calls["start"] += 1
        state = ScriptState(
            [list(p) for p in prompts], [0] * len(prompts), [[] for _ in prompts], [False] * len(prompts)
        )
        self.last_state = state
        return state, self._output(state, [list(p) for p in prompts])

    def step(self, state: ScriptState, tokens: list[list[int]]) -> StepOutput:
        self.calls["step"] += 1
        if len(tokens) != len(state.seqs):
            raise ValueError(f"step got {len(tokens)} rows, expected {len(state.seqs)}")
        for i, toks in enumerate(tokens):
            if self.max_append is not None and len(toks) > self.max_append:
                raise ValueError(
                    f"row {i}: {len(toks)} tokens appended at once > max_append {self.max_append}"
                )
            for t in map(int, toks):
                state.seqs[i].append(t)
                state.appended[i].append(t)
                if self.forced_brackets and t in self.forced_brackets:
                    state.inside[i] = t == self.forced_brackets[0]
                    continue
                if len(toks) == 1 and not state.inside[i] and t == self._target(i, state.cursor[i]):
                    state.cursor[i] += 1
        return self._output(state, tokens)
