"""Multi-turn chat: the history as unified-record messages, with media in any turn.

Each turn appends the user message (media placeholders put in front when the text has none) and then the
assistant's turn as the model actually produced it: every tool call that parsed, with its observation as a
``tool`` message, then the answer text and a ``generate`` entry per signal span — so the next prompt is
rendered by the training renderer from the same kind of record the model was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..agent.spec import ToolResult
from ..agent.state import RowResult
from ..core.react import read_react
from ..core.toolcall import UNREAD
from .requests import MEDIA_KEYS, Request, split_media, with_placeholders


def tool_messages(result: ToolResult) -> list[dict]:
    """A tool call that ran and what the model was shown, as the history's call + tool messages; ``[]``
    for a malformed call (name ``UNREAD``, or arguments that are not an object): nothing the renderer
    could write back."""
    args = result.arguments
    if isinstance(args, str):  # a ReAct call keeps its raw Action Input
        args = {"input": args}
    if result.name == UNREAD or not isinstance(args, dict):
        return []
    call = {"type": "function", "function": {"name": result.name, "arguments": args}}
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": result.name, "content": result.observation()},
    ]


def assistant_messages(row: RowResult, react: bool) -> list[dict]:
    """The assistant turn of ``row`` as messages (calls + tool results, then the answer)."""
    msgs = [m for r in row.tool_results for m in tool_messages(r)]
    text = row.text.strip()
    if react:
        final = read_react(row.text).final
        text = final.answer.strip() if final is not None else ("" if msgs else text)
    answer: dict = {"role": "assistant", "content": text}
    generated = [
        {"modality": ev.modality, "caption": "", "media": Path(ev.result["path"]).name}
        for ev in row.signals
        if isinstance(ev.result, dict) and "path" in ev.result
    ]
    if generated:
        answer["generate"] = generated
    return [*msgs, answer]  # always closed by an answer message (possibly empty: just the turn end)


class ChatSession:
    """One conversation with a runtime (``Runtime.chat`` uses one; the app keeps one per browser)."""

    def __init__(self, runtime, system: str | None = None):
        self.runtime = runtime
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.media: dict[str, list[str]] = {k: [] for k in MEDIA_KEYS.values()}
        self.tools: list | None = None  # tool specs offered in the prompt (HF function form), if any
        self.turns: list[dict] = []  # every turn's output

    def send(
        self,
        text: str = "",
        media: Sequence[tuple[str, str]] = (),
        *,
        on_text: Callable[[int, str], None] | None = None,
    ) -> dict:
        """One user turn (text and ``[(modality, path)]``) -> the turn's output dict; history grows."""
        outs, _ = send_turns([self], [(text, media)], on_text=on_text)
        return outs[0]

    def request(self, text: str = "", media: Sequence[tuple[str, str]] = ()):
        """The ``Request`` for the next turn: the history plus this user message and its media."""
        user = {"role": "user", "content": with_placeholders(text, media)}
        new = split_media(media)
        return Request(
            messages=[*self.messages, user],
            tools=self.tools,
            **{k: self.media[k] + new[k] for k in MEDIA_KEYS.values()},
        )

    def commit(self, req, out: dict, row: RowResult | None) -> None:
        """Record a turn run from ``self.request(...)``: a turn that ran joins the history."""
        if row is not None:
            self.messages += [req.messages[-1], *assistant_messages(row, self.runtime.react)]
            for k in MEDIA_KEYS.values():
                self.media[k] = list(getattr(req, k))
        self.turns.append(out)

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.media = {k: [] for k in MEDIA_KEYS.values()}
        self.turns = []


def send_turns(
    sessions: Sequence[ChatSession],
    turns: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    *,
    on_text: Callable[[int, str], None] | None = None,
) -> tuple[list[dict], list[RowResult | None]]:
    """One user turn ``(text, media)`` for each session (all of one runtime), generated as one batch;
    each session's history grows exactly as ``ChatSession.send`` grows it. Returns the turns' output
    dicts and engine rows (None for a turn that could not run), as ``Runtime.run_rows``."""
    if len(sessions) != len(turns):
        raise ValueError(f"{len(sessions)} sessions but {len(turns)} turns")
    if not sessions:
        return [], []
    runtime = sessions[0].runtime
    if any(s.runtime is not runtime for s in sessions):
        raise ValueError("send_turns: every session must belong to the same runtime")
    reqs = [s.request(text, media) for s, (text, media) in zip(sessions, turns)]
    outs, rows = runtime.run_rows(reqs, on_text=on_text)
    for s, req, out, row in zip(sessions, reqs, outs, rows):
        s.commit(req, out, row)
    return outs, rows
