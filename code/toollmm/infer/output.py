"""What a generation returns to users: the ``--json`` object, and streamed text.

``output_dict`` builds the one result form shared by ``code/inference.py --json`` / ``--batch``, the app,
``Runtime.chat`` and the benchmarks' generator::

    {"text", "tool_calls": [{"name", "arguments", "result", "error", "duration_s"}],
     "media": [{"modality", "path", "seed"}], "errors": [], "timings": {"load_s", "first_token_s", "total_s"}}

``TextStream`` turns the engine's per-token callback into text deltas per row (what the user sees:
tool-call and tool-result spans hidden in token format, special tokens dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..agent.state import RowResult


def error_output(message: str, load_s: float = 0.0) -> dict:
    """The result form for a request that could not run at all (bad media, unrenderable prompt)."""
    return {
        "text": "",
        "tool_calls": [],
        "media": [],
        "errors": [message],
        "timings": {"load_s": round(load_s, 4), "first_token_s": 0.0, "total_s": 0.0},
    }


def tool_call_dicts(row: RowResult) -> list[dict]:
    return [
        {
            "name": r.name,
            "arguments": r.arguments,
            "result": r.result,
            "error": r.error,
            "duration_s": r.duration_s,
        }
        for r in row.tool_results
    ]


def row_media(row: RowResult, produced: list[dict]) -> list[dict]:
    """The media of ``row`` among ``produced`` (sink entries of this call, in order): its signal spans'
    files, and files written by its tool calls (their results name them)."""
    mine = {ev.result["path"] for ev in row.signals if isinstance(ev.result, dict) and "path" in ev.result}
    results = [r.result for r in row.tool_results if r.ok and isinstance(r.result, str)]
    out = []
    for e in produced:
        name = Path(e["path"]).name
        by_tool = e["origin"].startswith("tool:") and any(name in res for res in results)
        if e["path"] in mine or by_tool:
            out.append({k: e[k] for k in ("modality", "path", "seed")})
    return out


def output_dict(row: RowResult, media: list[dict], load_s: float, prep_s: float) -> dict:
    return {
        "text": row.text,
        "tool_calls": tool_call_dicts(row),
        "media": media,
        "errors": list(row.errors),
        "timings": {
            "load_s": round(load_s, 4),
            "first_token_s": round(prep_s + row.timings.get("first_token_s", 0.0), 4),
            "total_s": round(prep_s + row.timings.get("total_s", 0.0), 4),
        },
    }


class TextStream:
    """``on_tokens(row, ids)`` for the engine -> ``on_text(row, delta)`` with the visible text's growth."""

    def __init__(
        self,
        tokenizer,
        visible: Callable[[list[int]], list[int]],
        on_text: Callable[[int, str], None],
        stop_strings: tuple[str, ...] = (),
    ):
        self.tok, self.visible, self.on_text = tokenizer, visible, on_text
        self.stop_strings = tuple(x for x in stop_strings if x)
        self.ids: dict[int, list[int]] = {}
        self.shown: dict[int, str] = {}

    def _held_back(self, text: str) -> str:
        """``text`` without a stop string and what follows it, and without a tail that may still become
        one (``#`` or ``##`` before ``###``): the engine ends the row there and never shows it."""
        for x in self.stop_strings:
            cut = text.find(x)
            if cut >= 0:
                text = text[:cut]
        hold = max(
            (k for x in self.stop_strings for k in range(1, len(x)) if text.endswith(x[:k])), default=0
        )
        return text[: len(text) - hold].rstrip()

    def __call__(self, row: int, ids: list[int]) -> None:
        self.ids.setdefault(row, []).extend(ids)
        text = self.tok.decode(self.visible(self.ids[row]), skip_special_tokens=True)
        if self.stop_strings:
            text = self._held_back(text)
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its next piece
            return
        old = self.shown.get(row, "")
        if text.startswith(old) and len(text) > len(old):
            self.on_text(row, text[len(old) :])
            self.shown[row] = text
        elif not text.startswith(old):  # decoding merged differently (rare): show the rest on a new line
            self.on_text(row, "\n" + text)
            self.shown[row] = text
