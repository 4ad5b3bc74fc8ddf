"""Unified-schema records of the demo corpus, one builder per task. Media are rendered by ``corpus``;
here a render is a ``Render(path, modality, attrs)`` with its path relative to the corpus folder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toollmm.core.tokens import PLACEHOLDER
from toollmm.demo import text

from .tools import DEMO_TOOLS, TOOL_NAMES, number_split, pseudo_name, tool_conversation

SOURCE = "toollmm_demo"
MEDIA_KEY = {"image": "images", "audio": "audios", "video": "videos"}


@dataclass(frozen=True)
class Render:
    path: str
    modality: str
    attrs: dict

    @property
    def caption(self) -> str:
        return text.caption(self.modality, self.attrs)


def _record(rid: str, task: str, messages: list[dict], split: str, **extra) -> dict:
    rec = {"id": rid, "source": SOURCE, "task": task, "messages": messages}
    rec |= {k: v for k, v in extra.items() if v is not None and k != "eval"}
    if split == "heldout" and extra.get("eval") is not None:
        rec["eval"] = extra["eval"]
    return rec


def _media_eval(r: Render) -> dict:
    return {
        "acceptable": [r.caption],
        "reference": {"caption": r.caption, "attributes": dict(r.attrs)},
        "modality": r.modality,
    }


def x2t(r: Render, rid: str, split: str, rng: np.random.Generator) -> dict:
    """Stage 1: the medium and an instruction in, its caption out."""
    msgs = [
        {"role": "user", "content": f"{PLACEHOLDER[r.modality]}\n{text.x2t_turn(r.modality, rng)}"},
        {"role": "assistant", "content": r.caption},
    ]
    meta = {"attributes": dict(r.attrs), "caption": r.caption}
    return _record(
        rid, "x2t", msgs, split, **{MEDIA_KEY[r.modality]: [r.path]}, eval=_media_eval(r), meta=meta
    )


def t2x(r: Render, rid: str, split: str, rng: np.random.Generator) -> dict:
    """Stage 2: a request in, a short answer plus a generation target (the caption; ``r`` is a reference)."""
    q, a = text.t2x_turns(r.modality, r.caption, rng)
    gen = {"modality": r.modality, "caption": r.caption, "media": r.path}
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a, "generate": [gen]}]
    meta = {"attributes": dict(r.attrs), "caption": r.caption}
    return _record(rid, "t2x", msgs, split, eval=_media_eval(r), meta=meta)


def _chat(turns: list[tuple[str, str]], first_prefix: str) -> list[dict]:
    msgs = []
    for i, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": (first_prefix + q) if i == 0 else q})
        msgs.append({"role": "assistant", "content": a})
    return msgs


def instruct(r: Render, rid: str, split: str, rng: np.random.Generator) -> dict:
    """Stage 3: 1-3 turns of questions about one medium's attributes."""
    turns = text.instruct_turns(r.modality, r.attrs, rng)
    msgs = _chat(turns, PLACEHOLDER[r.modality] + "\n")
    ev = {"acceptable": [turns[-1][1]], "reference": [a for _, a in turns], "modality": r.modality}
    meta = {"attributes": dict(r.attrs), "caption": r.caption}
    return _record(rid, "instruct", msgs, split, **{MEDIA_KEY[r.modality]: [r.path]}, eval=ev, meta=meta)


def tool_use(tool: str, rid: str, split: str, rng: np.random.Generator) -> dict:
    """Stage 3: request -> tool call -> tool result -> answer, with the demo tool set offered. Half the
    training cities and words are made up (``pseudo_name``): with only the fixed training lists, the LoRA
    learns to write a known city instead of copying the request's (held-out "Zurich" came out "Zuku")."""
    pseudo = split == "train" and bool(rng.random() < 0.5)
    msgs, info = tool_conversation(tool, split, rng, pseudo=pseudo)
    call = msgs[1]["tool_calls"][0]["function"]
    ev = {"acceptable": [call], "reference": [call], "split": "unseen_arguments_and_phrasings"}
    meta = {"tool": tool, "template": info["template"]}
    return _record(rid, "instruct", msgs, split, tools=DEMO_TOOLS, eval=ev, meta=meta)


# ------------------------------------------------------------------------- stand-in LM text
def lm_copy(modality: str, attrs: dict, rid: str, rng: np.random.Generator) -> dict:
    """The x2t pattern with the medium replaced by its attribute words: teaches copying from context."""
    words, cap = text.attribute_words(modality, attrs), text.caption(modality, attrs)
    if rng.random() < 0.25:
        msgs = [{"role": "user", "content": f"{words} caption:"}, {"role": "assistant", "content": cap}]
    else:
        msgs = [{"role": "user", "content": f"{words}\n{text.x2t_turn(modality, rng)}"},
                {"role": "assistant", "content": cap}]  # fmt: skip
    return _record(rid, "instruct", msgs, "train", meta={"kind": "copy", "modality": modality})


def lm_instruct(modality: str, attrs: dict, rid: str, rng: np.random.Generator) -> dict:
    msgs = _chat(text.instruct_turns(modality, attrs, rng), text.attribute_words(modality, attrs) + "\n")
    return _record(rid, "instruct", msgs, "train", meta={"kind": "instruct", "modality": modality})


def lm_t2x(modality: str, attrs: dict, rid: str, rng: np.random.Generator) -> dict:
    q, a = text.t2x_turns(modality, text.caption(modality, attrs), rng)
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return _record(rid, "instruct", msgs, "train", meta={"kind": "t2x", "modality": modality})


LM_TOOL_MADE_UP = 0.7  # share of the stand-in LM's tool conversations with made-up cities and words


def lm_tool(index: int, rid: str, rng: np.random.Generator) -> dict:
    """A training-template tool conversation; most cities and words are made up, so the LM learns to
    copy spellings it has never seen (held-out cities and words are unseen)."""
    tool = TOOL_NAMES[index % len(TOOL_NAMES)]
    msgs, info = tool_conversation(tool, "train", rng, pseudo=bool(rng.random() < LM_TOOL_MADE_UP))
    meta = {"kind": "tool", "tool": tool, "template": info["template"]}
    return _record(rid, "instruct", msgs, "train", tools=DEMO_TOOLS, meta=meta)


REPEAT_TEMPLATES = [("Repeat: {s}", "{s}"), ("Say exactly this: {s}", "{s}"), ("Copy: {s}", "{s}")]


def _repeat_item(rng: np.random.Generator):
    """A number (1-4 digits, never a held-out value) or a made-up name: nothing the LM can guess."""
    if rng.random() < 0.5:
        while True:
            n = int(rng.integers(1, 10 ** int(rng.integers(1, 5))))
            if number_split(n) == "train":
                return n
    return pseudo_name(rng, capital=bool(rng.random() < 0.5))


def lm_repeat(rid: str, rng: np.random.Generator) -> dict:
    """A copy drill: repeat two to six unseen numbers and names exactly. Tool calls need
    this skill (copy the request's argument values into the call); the tool conversations alone teach it slowly."""
    items = [_repeat_item(rng) for _ in range(int(rng.integers(2, 7)))]
    text = " ".join(str(x) for x in items)
    q, a = REPEAT_TEMPLATES[int(rng.integers(len(REPEAT_TEMPLATES)))]
    msgs = [{"role": "user", "content": q.format(s=text)}, {"role": "assistant", "content": a.format(s=text)}]
    return _record(rid, "instruct", msgs, "train", meta={"kind": "repeat"})


# ------------------------------------------------------------------------------ multi-turn chats
TURN_KINDS = ("tool", "caption", "generate")


def _caption_turn(r: Render, rng: np.random.Generator) -> tuple[list[dict], dict]:
    """A medium attached to this turn and a request for its caption -> the caption (as x2t answers)."""
    msgs = [
        {"role": "user", "content": f"{PLACEHOLDER[r.modality]}\n{text.x2t_turn(r.modality, rng)}"},
        {"role": "assistant", "content": r.caption},
    ]
    return msgs, {"kind": "caption", "modality": r.modality, "answer": r.caption}


def _generate_turn(r: Render, rng: np.random.Generator) -> tuple[list[dict], dict]:
    """A text->X request -> the short answer and a signal span (as t2x answers; ``r`` is a reference)."""
    q, a = text.t2x_turns(r.modality, r.caption, rng)
    gen = {"modality": r.modality, "caption": r.caption, "media": r.path}
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a, "generate": [gen]}]
    return msgs, {"kind": "generate", "modality": r.modality, "caption": r.caption, "answer": a}


def _tool_turn(tool: str, split: str, rng: np.random.Generator) -> tuple[list[dict], dict]:
    """A tool request -> call -> result -> answer (the single-turn tool conversation of ``split``)."""
    msgs, info = tool_conversation(tool, split, rng)
    call = msgs[1]["tool_calls"][0]["function"]
    return msgs, {"kind": "tool", "tool": tool, "call": call, "answer": msgs[-1]["content"]}


def turn_plan(rng: np.random.Generator, n_turns: int) -> list[str]:
    """``n_turns`` turn kinds, at least two different ones (a chat mixes tools, media input, generation)."""
    while True:
        kinds = [TURN_KINDS[int(rng.integers(len(TURN_KINDS)))] for _ in range(n_turns)]
        if len(set(kinds)) > 1:
            return kinds


def multi_turn(renders: dict, rid: str, split: str, rng: np.random.Generator) -> dict:
    """Stage 3: a 2-3 turn chat mixing tool calls, media input (attached in the turn that asks about it) and
    generation, written exactly as the single-turn tool / x2t / t2x records write each turn. ``renders`` is
    ``{modality: [Render]}`` of ``split``; tool turns use ``split``'s argument values and phrasings.
    Held-out records carry ``eval.reference``: per assistant turn its kind and expected call / answer."""
    msgs: list[dict] = []
    media: dict[str, list[str]] = {}
    turns = []
    for kind in turn_plan(rng, int(rng.integers(2, 4))):
        if kind == "tool":
            part, info = _tool_turn(TOOL_NAMES[int(rng.integers(len(TOOL_NAMES)))], split, rng)
        else:
            m = ("image", "audio", "video")[int(rng.integers(3))]
            r = renders[m][int(rng.integers(len(renders[m])))]
            if kind == "caption":
                part, info = _caption_turn(r, rng)
                media.setdefault(MEDIA_KEY[m], []).append(r.path)
            else:
                part, info = _generate_turn(r, rng)
        msgs += part
        turns.append(info)
    ev = {"reference": turns, "split": "unseen_arguments_and_phrasings; new renders"}
    meta = {"kind": "multi_turn", "turns": [t["kind"] for t in turns]}
    return _record(rid, "instruct", msgs, split, **media, tools=DEMO_TOOLS, eval=ev, meta=meta)
