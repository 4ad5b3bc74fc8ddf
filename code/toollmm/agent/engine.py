"""The decode state machine: one row state per sequence, tool calls and signal spans handled in-stream.

Per step every unfinished row appends either its pending FORCED tokens or one SAMPLED token (placeholders
and ``<tool_result>`` / ``</tool_result>`` are banned from sampling). A row is in one of three modes:

* ``text``: ``<tool_call>`` opens a call (``tool_format: tokens``); ``[IMG0]`` (any modality's first
  signal token) opens a span; EOS ends the row. With ``tool_format: react`` a step that ends with
  ``Observation:`` runs its ``Action`` on its ``Action Input`` and `` {observation}\\n`` is forced.
* ``call``: tokens are collected until ``</tool_call>``; the JSON is parsed (never raising), validated
  and run by the registry (time limit), and ``<tool_result>{observation}</tool_result>`` is forced.
* ``signal``: the span's tokens must follow in order. A complete span calls the signal hook with the
  row, modality, positions and (if the model returns them) hidden states. An interrupted span (wrong
  token, EOS, max tokens) is force-completed (``partial_signal: complete``) or reported and dropped
  (``report``) — NExT-GPT asserted here (#30, #66).

``stop_strings`` (the chat template's, e.g. vicuna_v0's ``###``) end a row like EOS (finish reason
``stop_string``) when the model's own text — never a forced tool result or signal span — comes to contain
one; the answer ``text`` is cut before it (trailing whitespace dropped), ``raw_text`` keeps it.

Nothing the model writes can crash the engine: every problem lands in the row's ``errors``. Limits:
``max_new_tokens`` sampled tokens, ``max_tool_steps`` call attempts, ``max_repeated_calls`` identical calls.

Per call, ``generate`` also takes ``on_tokens(row, ids)`` (every token a row appends, sampled or forced: the
streaming hook), a ``signal_hook`` for this call only, and ``stop_at_tool_call`` (per row): the row ends
right after its first tool call, which is parsed and reported (``result`` None) but NOT run — the
benchmarks' teacher-forced protocol. ``options`` (per row, ``RowOptions``) give a row its own sampling
(temperature, top-p and a seed of its own, so its tokens do not depend on the other rows), token budget,
extra banned ids, a prefix it must start with (e.g. ``<tool_call>``), stop strings of its own (added to the
template's; finish ``stop_string``) and a
``cancelled()`` probe (finish ``cancelled``: a client that went away frees its row).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from toollmm.core.config import InferenceConfig
from toollmm.core.tokens import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESULT_END,
    TOOL_RESULT_START,
    TokenContract,
)

from ..core.react import REACT_STOP_RE, react_action
from ..core.toolcall import UNREAD, parse_tool_call
from .forcing import ForcedText
from .protocol import SignalHook, StepModel
from .registry import Registry, ToolResult
from .sampling import Sampler
from .sandbox import truncate
from .state import RowResult, RowState, SignalEvent, Span

__all__ = ["Engine", "RowOptions", "RowResult", "SignalEvent"]

log = logging.getLogger(__name__)


@dataclass
class RowOptions:
    """Per-row settings of one ``generate`` call (None = the engine's ``InferenceConfig`` value)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None  # the row's own sampling generator
    max_new_tokens: int | None = None
    banned: Sequence[int] = ()  # ids this row may never sample (e.g. ``<tool_call>`` for tool_choice none)
    prefix: Sequence[int] = ()  # ids the row starts with, taken as if sampled (e.g. a forced tool call)
    stop: Sequence[str] = ()  # visible text that ends the row (finish_reason ``stop``)
    cancelled: Callable[[], bool] | None = None  # probed every step; True ends the row (``cancelled``)
    extra: dict = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        model: StepModel,
        tokenizer,
        registry: Registry,
        cfg: InferenceConfig | None = None,
        *,
        tool_format: str = "tokens",
        contract: TokenContract | None = None,
        signal_hook: SignalHook | None = None,
        stop_strings: Sequence[str] = (),
    ):
        if tool_format not in ("tokens", "react"):
            raise ValueError(f"tool_format must be 'tokens' or 'react', got {tool_format!r}")
        self.model, self.tok, self.registry = model, tokenizer, registry
        self.cfg = cfg or InferenceConfig()
        self.react = tool_format == "react"
        self.signal_hook = signal_hook
        self.ids = (contract or TokenContract()).ids(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.t = self.ids.tool
        self.sig = {tid: (m, k) for m, lst in self.ids.signal.items() for k, tid in enumerate(lst)}
        banned = self.ids.group_ids("placeholder") + [self.t[TOOL_RESULT_START], self.t[TOOL_RESULT_END]]
        self.sampler = Sampler(self.cfg.temperature, self.cfg.top_p, self.cfg.seed, banned)
        self.text = ForcedText(tokenizer, self.ids)
        self.max_append = getattr(model, "max_append", None)
        self.stop_strings = tuple(x for x in stop_strings if x)
        if self.react and "Observation:" in self.stop_strings:
            raise ValueError("stop_strings: 'Observation:' runs the ReAct action, it cannot also end the row")

    # ------------------------------------------------------------------------------ main loop
    def generate(
        self,
        prompts: list[list[int]],
        media: Any = None,
        *,
        on_tokens: Callable[[int, list[int]], None] | None = None,
        signal_hook: SignalHook | None = None,
        stop_at_tool_call: bool | Sequence[bool] = False,
        options: Sequence[RowOptions | None] | None = None,
    ) -> list[RowResult]:
        t0 = time.perf_counter()
        stops = (
            [stop_at_tool_call] * len(prompts) if isinstance(stop_at_tool_call, bool) else stop_at_tool_call
        )
        if len(stops) != len(prompts):
            raise ValueError(f"stop_at_tool_call: {len(stops)} flags for {len(prompts)} prompts")
        opts = list(options) if options is not None else [None] * len(prompts)
        if len(opts) != len(prompts):
            raise ValueError(f"options: {len(opts)} entries for {len(prompts)} prompts")
        rows = [self.new_row(i, len(p), bool(s), o) for i, (p, s, o) in enumerate(zip(prompts, stops, opts))]
        hook = signal_hook if signal_hook is not None else self.signal_hook
        state, out = self.model.start([list(p) for p in prompts], media)
        model_s = time.perf_counter() - t0
        while True:
            starts = [len(r.gen) for r in rows]
            appends = []
            for r in rows:
                appends.append(self.next_tokens(r, out.logits[r.index], t0))
            if not any(appends):
                break
            ts = time.perf_counter()
            out = self.model.step(state, appends)
            model_s += time.perf_counter() - ts
            for r, toks, s in zip(rows, appends, starts):
                if toks:
                    hid = out.hidden[r.index] if out.hidden is not None else None
                    self.collect(r, r.prompt_len + s, len(toks), hid, state, hook)
                    if on_tokens is not None:
                        on_tokens(r.index, list(toks))
        return [self.result(r, model_s) for r in rows]

    # The per-row steps of a decode loop: ``generate`` above and the server's continuous batch
    # (``serve/batcher.py``) both drive rows through exactly these.
    def new_row(
        self, index: int, prompt_len: int, stop_at_call: bool, options: RowOptions | None
    ) -> RowState:
        """A row's decode state: the engine's defaults, then ``options`` (limits, sampling, prefix, stops)."""
        row = RowState(index, prompt_len, stop_at_call=stop_at_call)
        self._apply_options(row, options)
        return row

    def next_tokens(self, row: RowState, logits: torch.Tensor, t0: float) -> list[int]:
        """The tokens ``row`` appends next from its latest ``logits`` (sampled, forced or a tool result);
        ``[]`` once it has finished (a cancelled row finishes ``cancelled`` here)."""
        if not row.finish_reason and row.cancelled is not None and row.cancelled():
            self._finish(row, "cancelled", t0)
        toks = [] if row.finish_reason else self._advance(row, logits, t0)
        if not toks and not row.finish_reason:  # defensive: a row must progress or finish
            self._finish(row, "error", t0, "internal: the row made no progress")
        return toks

    def _apply_options(self, row: RowState, o: RowOptions | None) -> None:
        row.max_new_tokens = self.cfg.max_new_tokens
        row.stop = self.stop_strings
        if o is None:
            return
        if o.max_new_tokens is not None:
            row.max_new_tokens = int(o.max_new_tokens)
        if any(x is not None for x in (o.temperature, o.top_p, o.seed)) or o.banned:
            row.sampler = Sampler(
                self.cfg.temperature if o.temperature is None else o.temperature,
                self.cfg.top_p if o.top_p is None else o.top_p,
                self.cfg.seed if o.seed is None else o.seed,
                [*self.sampler.banned.tolist(), *o.banned],
            )
        row.prefix = deque(int(t) for t in o.prefix)
        row.stop = self.stop_strings + tuple(s for s in o.stop if s and s not in self.stop_strings)
        row.cancelled = o.cancelled

    def _advance(self, row: RowState, logits: torch.Tensor, t0: float) -> list[int]:
        if row.pending:
            n = len(row.pending) if not self.max_append else min(self.max_append, len(row.pending))
            out = [self._emit(row, *row.pending.popleft()) for _ in range(n)]
            row.free_start = len(row.gen)  # stop strings are looked for in the model's own text only
            return out
        if row.stop_after_pending:
            self._finish(row, row.stop_after_pending, t0)
            return []
        if row.prefix:  # a required start: taken as if the model had sampled it
            return self._on_token(row, row.prefix.popleft(), t0)
        if row.sampled >= row.max_new_tokens:
            return self._out_of_budget(row, t0)
        tok = (row.sampler or self.sampler)(logits)
        row.sampled += 1
        if row.first_token_s is None:
            row.first_token_s = round(time.perf_counter() - t0, 4)
        if tok is None:
            self._finish(row, "error", t0, "the model gave no usable next token (NaN logits or all banned)")
            return []
        return self._on_token(row, tok, t0)

    def _on_token(self, row: RowState, t: int, t0: float) -> list[int]:
        if row.mode == "signal":
            span = row.span
            if t == span.ids[len(span.positions)]:
                return [self._emit(row, t, span)]
            if self._interrupt(row, self._describe(t), stop_reason="eos" if t == self.eos else None):
                return self._advance(row, torch.empty(0), t0)  # pending now holds the completion
        if t == self.eos:
            if row.mode == "call":
                row.errors.append("unterminated tool call at the end of the answer (not run)")
            self._finish(row, "eos", t0)
            return []
        if row.mode == "call":
            return self._in_call(row, t, t0)
        if not self.react and t == self.t[TOOL_CALL_START]:
            row.mode, row.call_ids = "call", []
            return [self._emit(row, t)]
        if t in self.sig:
            return [self._on_signal_token(row, t)]
        if not self.react and t == self.t[TOOL_CALL_END]:
            row.warnings.append("stray </tool_call> without <tool_call> (ignored)")
        out = [self._emit(row, t)]
        if self.react:
            self._react_check(row, t0)
        if row.stop and not row.pending:
            self._stop_string_check(row, t0)
        return out

    def _stop_string_check(self, row: RowState, t0: float) -> None:
        window = max(len(x) for x in row.stop) + 2  # a stop string is at most this many tokens
        tail = self.tok.decode(row.gen[max(row.free_start, len(row.gen) - window) :])
        hit = next((x for x in row.stop if x in tail), None)
        if hit is not None:
            row.stop_string = hit
            self._finish(row, "stop_string", t0)

    # ------------------------------------------------------------------------------ signal spans
    def _on_signal_token(self, row: RowState, t: int) -> int:
        modality, k = self.sig[t]
        if k != 0:
            row.errors.append(f"stray {self._describe(t)} outside a {modality} signal span (ignored)")
            return self._emit(row, t)
        row.span, row.mode = Span(modality, list(self.ids.signal[modality])), "signal"
        return self._emit(row, t, row.span)

    def _interrupt(self, row: RowState, why: str, stop_reason: str | None = None) -> bool:
        """An unfinished span: True if completed by forcing (pending filled), False if reported."""
        span, got, n = row.span, len(row.span.positions), len(row.span.ids)
        row.span, row.mode = None, "text"
        if self.cfg.partial_signal == "complete":
            span.forced = True
            row.pending.extend((tid, span) for tid in span.ids[got:])
            row.stop_after_pending = stop_reason
            row.warnings.append(
                f"{span.modality} signal span interrupted after {got} of {n} tokens by {why}; completed"
            )
            return True
        for p in span.positions:
            row.wanted.pop(p, None)
        row.signals.append(SignalEvent(span.modality, span.positions, False, error="incomplete span"))
        row.errors.append(
            f"incomplete {span.modality} signal span: {got} of {n} tokens, interrupted by {why}; "
            f"no {span.modality} generated"
        )
        return False

    def collect(self, row: RowState, start: int, n: int, hidden, state: Any, hook: SignalHook | None) -> None:
        """Attach hidden states of the tokens just appended; fire the hook for spans now complete."""
        for j, pos in enumerate(range(start, start + n)):
            span = row.wanted.pop(pos, None)
            if span is None:
                continue
            ok = hidden is not None and j < len(hidden)
            span.hidden.append(hidden[j] if ok else None)
            if len(span.hidden) == len(span.ids):
                self._fire(row, span, state, hook)

    def _fire(self, row: RowState, span: Span, state: Any, hook: SignalHook | None) -> None:
        hidden = None if any(h is None for h in span.hidden) else torch.stack(list(span.hidden))
        ev = SignalEvent(span.modality, list(span.positions), span.forced)
        where = f"{span.modality} signal span at positions {span.positions[0]}..{span.positions[-1]}"
        if hook is None:
            ev.error = "no signal hook"
            row.errors.append(f"{where}: no decoder hook in this session, nothing generated")
        else:
            try:
                ev.result = hook(
                    row=row.index, modality=span.modality, positions=ev.positions, hidden=hidden, state=state
                )
            except Exception as e:
                ev.error = truncate(f"{type(e).__name__}: {e}", 500)
                row.errors.append(f"{where}: {span.modality} generation failed: {ev.error}")
        row.signals.append(ev)

    # ------------------------------------------------------------------------------ tool calls
    def _in_call(self, row: RowState, t: int, t0: float) -> list[int]:
        if t == self.t[TOOL_CALL_END]:
            out = [self._emit(row, t)]
            row.mode = "text"
            self._attempt(row, lambda: self._json_call(row), t0)
            return out
        row.call_ids.append(t)
        out = [self._emit(row, t)]
        if len(row.call_ids) > self.cfg.tool_max_call_tokens:
            row.mode = "text"
            row.pending.append((self.t[TOOL_CALL_END], None))
            msg = f"tool call longer than {self.cfg.tool_max_call_tokens} tokens; abandoned"
            self._attempt(row, lambda: ToolResult(UNREAD, None, None, msg, 0.0), t0)
        return out

    def _json_call(self, row: RowState) -> ToolResult | None:
        text = self.tok.decode(row.call_ids)
        special = [t for t in row.call_ids if t in self.text.never]  # toollmm's and the tokenizer's own
        if special:  # e.g. a signal token inside an argument: not run, and kept out of the chat history
            names = ", ".join(dict.fromkeys(self.tok.convert_ids_to_tokens(special)))
            return ToolResult(
                UNREAD,
                truncate(text, 300),
                None,
                f"malformed tool call: special token {names} inside it",
                0.0,
            )
        call, err = parse_tool_call(text)  # the scorers read the same text with the same parser
        if call is None:
            return ToolResult(UNREAD, truncate(text, 300), None, f"malformed tool call: {err}", 0.0)
        return self._run_tool(row, call["name"], call["arguments"], text_input=False)

    def _react_check(self, row: RowState, t0: float) -> None:
        seg = row.gen[row.segment_start :]
        if not REACT_STOP_RE.search(self.tok.decode(seg[-32:])):
            return
        text = self.tok.decode(seg)
        if not REACT_STOP_RE.search(text):  # the short tail started mid-line
            return
        action = react_action(text)
        if action is None:
            msg = "could not read an 'Action:' line and an 'Action Input:' line before 'Observation:'"
            self._attempt(row, lambda: ToolResult(UNREAD, truncate(text[-300:], 300), None, msg, 0.0), t0)
        else:
            self._attempt(
                row, lambda: self._run_tool(row, action.tool, action.tool_input, text_input=True), t0
            )
        row.segment_start = len(row.gen) + len(row.pending)

    def _attempt(self, row: RowState, make_result, t0: float) -> None:
        """One call attempt under the step limit; its observation is queued as forced tokens."""
        if row.tool_steps >= self.cfg.max_tool_steps:
            row.errors.append(f"tool step limit ({self.cfg.max_tool_steps}) reached; further calls not run")
            self._stop(row, "tool_limit")
            return
        row.tool_steps += 1
        res = make_result()
        if res is None:  # runaway: the row was stopped
            return
        row.tool_results.append(res)
        if row.stop_at_call:  # parsed and reported, not run: the row ends here
            if not res.ok:
                row.errors.append(f"tool call 1 ({truncate(res.name, 100)}): {res.error}")
            self._stop(row, "tool_call")
            return
        if not res.ok:
            row.errors.append(f"tool call {len(row.tool_results)} ({truncate(res.name, 100)}): {res.error}")
        if self.react:
            body = self.text.plain(" " + res.observation() + "\n")
        else:
            body = self.text.wrapped(res.observation(), self.t[TOOL_RESULT_START], self.t[TOOL_RESULT_END])
        row.pending.extend((tid, None) for tid in body)

    def _run_tool(self, row: RowState, name: str, args: Any, *, text_input: bool) -> ToolResult | None:
        if row.stop_at_call:  # reported as written (ReAct: the raw Action Input), not run
            spec = self.registry.get(name)
            return ToolResult(spec.name if spec else truncate(str(name), 200), args, None, None, 0.0)
        key = json.dumps([name, args], sort_keys=True, default=str)
        row.call_counts[key] += 1
        if row.call_counts[key] > self.cfg.max_repeated_calls:
            row.errors.append(
                f"runaway: identical call to {truncate(name, 100)!r} repeated {row.call_counts[key]} times; stopped"
            )
            self._stop(row, "runaway")
            return None
        return self.registry.call_text(name, args) if text_input else self.registry.call(name, args)

    # ------------------------------------------------------------------------------ helpers
    def _emit(self, row: RowState, tid: int, span: Span | None = None) -> int:
        if span is not None:
            pos = row.prompt_len + len(row.gen)
            span.positions.append(pos)
            row.wanted[pos] = span
            if len(span.positions) == len(span.ids) and row.span is span:
                row.span, row.mode = None, "text"
        row.gen.append(tid)
        return tid

    def _out_of_budget(self, row: RowState, t0: float) -> list[int]:
        row.errors.append(f"max_new_tokens ({row.max_new_tokens}) reached before the answer ended")
        if row.mode == "call":
            row.errors.append("unterminated tool call at max_new_tokens (not run)")
        if row.mode == "signal" and self._interrupt(row, "max_new_tokens", stop_reason="max_new_tokens"):
            return self._advance(row, torch.empty(0), t0)
        self._finish(row, "max_new_tokens", t0)
        return []

    def _stop(self, row: RowState, reason: str) -> None:
        row.pending.clear()
        row.stop_after_pending = reason

    def _finish(self, row: RowState, reason: str, t0: float, error: str | None = None) -> None:
        if error:
            row.errors.append(error)
        row.finish_reason = reason
        row.total_s = round(time.perf_counter() - t0, 4)

    def _describe(self, tid: int) -> str:
        if tid == self.eos:
            return "end of text"
        return repr(self.tok.convert_ids_to_tokens(int(tid)))

    def visible_ids(self, ids: Sequence[int]) -> list[int]:
        """What the user is shown of generated ``ids``: tool-call and tool-result spans removed (token
        format); the caller decodes with ``skip_special_tokens=True``."""
        if self.react:
            return list(ids)
        shown, inside = [], False
        opens = {self.t[TOOL_CALL_START], self.t[TOOL_RESULT_START]}
        closes = {self.t[TOOL_CALL_END], self.t[TOOL_RESULT_END]}
        for tid in ids:
            if tid in opens or tid in closes:
                inside = tid in opens
            elif not inside:
                shown.append(tid)
        return shown

    def result(self, row: RowState, model_s: float) -> RowResult:
        shown = self.visible_ids(row.gen)
        text = self.tok.decode(shown, skip_special_tokens=True)
        cut = text.rfind(row.stop_string) if row.stop_string is not None else -1
        if cut >= 0:
            text = text[:cut].rstrip()
        timings = {
            "first_token_s": row.first_token_s or 0.0,
            "total_s": row.total_s,
            "tool_s": round(sum(r.duration_s for r in row.tool_results), 4),
            "model_s": round(model_s, 4),
        }
        return RowResult(
            text=text,
            raw_text=self.tok.decode(row.gen),
            token_ids=list(row.gen),
            tool_results=row.tool_results,
            signals=row.signals,
            errors=row.errors,
            warnings=row.warnings,
            finish_reason=row.finish_reason or "error",
            timings=timings,
        )
