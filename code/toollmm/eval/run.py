"""Generate predictions for reference records with a model, then score them.

The model side is one callable, :class:`Generator`: ``generate(prompts) -> outputs``. A prompt is a unified
record cut where the model must continue (its ``messages`` end with the user turn or a tool result), with
``id`` (the reference id), ``step`` and ``stop_at_tool_call``; its media paths are absolute (relative ones
in the references are taken from ``media_root``, default: the references file's folder). When ``stop_at_tool_call`` is true the
generator stops after the first tool call WITHOUT running it (the ReAct ``Observation:`` stop, or
``</tool_call>``). An output is the inference ``--batch`` form ``{"text", "tool_calls": [{"name",
"arguments", ...}], ...}``; only ``text`` is required. An output with ``not_run`` (a reason: the request
could not run at all, e.g. its media file is missing) makes the record's prediction ``{"id", "not_run"}``.

``teacher-forced`` (default), as the reference files were built: step k's prompt holds the reference's
own calls 0..k-1 and their ground-truth observations; the model writes step k. It stops when the model
answers without a tool, when it calls a tool where the reference has no observation to feed back, or
after the step that follows the last reference step. ``free``: one prompt per record, the generator runs
its tools itself and its output is the prediction. Either way the assembled prediction is a ``--batch``
record (plus ``react``, the chain as ReAct text) scored by the same code as ``evaluate.py score``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from toollmm.core.react import (
    DEFAULT_CALL_THOUGHT,
    DEFAULT_FINAL_THOUGHT,
    action_of,
    format_react_call,
    format_react_final,
    format_react_observation,
    read_react,
)

from .common import EvalError, Reference
from .toolcalls import batch_calls, first_tool_call, input_text
from .viot import UPLOAD

log = logging.getLogger(__name__)

Generator = Callable[[list[dict]], list[dict]]
MODES = ("teacher-forced", "free")


@dataclass
class Step:
    """What the model wrote at one step: a call (``name``, ``input``) or an answer (``answer``)."""

    thought: str
    name: str | None = None
    input: str = ""
    answer: str | None = None


@dataclass
class Chain:
    ref: Reference
    context: list[dict]
    gt: list[tuple[dict, dict | None]]  # reference (call message, tool message or None)
    steps: list[Step] = field(default_factory=list)
    done: bool = False
    not_run: str | None = None


def split_reference(record: dict) -> tuple[list[dict], list[tuple[dict, dict | None]]]:
    """The messages before the supervised answer, and the reference's call steps with their observations."""
    msgs = record["messages"]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        raise EvalError(f"record {record.get('id')!r}: no user turn to answer")
    j = next(
        (
            i
            for i in range(users[-1] + 1, len(msgs))
            if msgs[i]["role"] == "assistant" and msgs[i].get("train", True)
        ),
        len(msgs),
    )
    gt: list[tuple[dict, dict | None]] = []
    for i in range(j, len(msgs)):
        m = msgs[i]
        if m["role"] == "assistant" and m.get("tool_calls"):
            nxt = msgs[i + 1] if i + 1 < len(msgs) and msgs[i + 1]["role"] == "tool" else None
            gt.append((m, nxt))
    return msgs[:j], gt


def _with_uploads(message: dict, record: dict) -> dict:
    """A reference call with VIoT upload placeholders replaced by the record's media path."""
    m = copy.deepcopy(message)
    for call in m.get("tool_calls", []):
        args = call["function"].get("arguments", {})
        raw = args.get("input")
        if isinstance(raw, str):
            for ph, (key, _) in UPLOAD.items():
                if ph in raw and record.get(key):
                    raw = raw.replace(ph, str(record[key][0]))
            args["input"] = raw
    return m


def _absolute(x, root: Path):
    if isinstance(x, list):  # a frame list
        return [_absolute(y, root) for y in x]
    if not isinstance(x, str):
        return x
    p = Path(os.path.expanduser(x))
    return str(p if p.is_absolute() else root / p)


def prompt_for(chain: Chain, k: int, mode: str, media_root: str | os.PathLike | None = None) -> dict:
    rec = chain.ref.record
    msgs = list(chain.context)
    for call, tool in chain.gt[:k]:
        msgs += [_with_uploads(call, rec), tool]
    prompt = {key: copy.deepcopy(rec[key]) for key in ("tools", "meta") if key in rec}
    root = Path(media_root) if media_root is not None else Path(chain.ref.file).parent
    for key in ("images", "videos", "audios"):
        if key in rec:
            prompt[key] = [_absolute(x, root) for x in rec[key]]
    prompt.update(id=rec["id"], step=k, messages=msgs, stop_at_tool_call=mode == "teacher-forced")
    return prompt


def read_step(out: dict) -> Step:
    """The first call or the answer of one generator output (never raises on model text). ReAct text
    comes first (it keeps the model's thought and raw Action Input), then ``tool_calls``, then
    ``<tool_call>`` spans; anything else is an answer."""
    text = out.get("text") if isinstance(out.get("text"), str) else ""
    parse = read_react(text)
    action = action_of(parse.steps[0]) if parse.steps else None
    if action is not None:
        return Step(parse.steps[0].thought or DEFAULT_CALL_THOUGHT, action.tool, action.tool_input)
    for c in batch_calls(out):
        return Step(DEFAULT_CALL_THOUGHT, c["name"], input_text(c.get("arguments", {})))
    call, _ = first_tool_call(text)
    if call is not None:
        return Step(DEFAULT_CALL_THOUGHT, call["name"], input_text(call["arguments"]))
    if parse.final is not None:
        return Step(parse.final.thought or DEFAULT_FINAL_THOUGHT, answer=parse.final.answer)
    return Step(DEFAULT_FINAL_THOUGHT, answer=text.strip())


def assemble(chain: Chain) -> dict:
    """The ``--batch`` prediction of a teacher-forced chain (observations are the reference's)."""
    if chain.not_run is not None:
        return {"id": chain.ref.id, "not_run": chain.not_run}
    calls, react, answer = [], [], ""
    for k, s in enumerate(chain.steps):
        if s.name is None:
            answer = s.answer or ""
            react.append(format_react_final(answer, s.thought))
            continue
        obs = chain.gt[k][1]["content"] if k < len(chain.gt) and chain.gt[k][1] is not None else None
        calls.append({"name": s.name, "arguments": {"input": s.input}, "result": obs, "error": None})
        react.append(format_react_call(s.name, s.input, s.thought))
        react.append(format_react_observation(obs, " ") if obs is not None else "\n")
    return {"id": chain.ref.id, "text": answer, "tool_calls": calls, "react": "".join(react)}


def _call(generate: Generator, prompts: list[dict], batch_size: int) -> list[dict]:
    outs: list[dict] = []
    for i in range(0, len(prompts), batch_size):
        part = prompts[i : i + batch_size]
        got = generate(part)
        if not isinstance(got, list) or len(got) != len(part):
            raise EvalError(
                f"generator returned {type(got).__name__} of {len(got) if isinstance(got, list) else '?'} outputs for {len(part)} prompts"
            )
        for p, o in zip(part, got):
            if not isinstance(o, dict) or not isinstance(o.get("text", ""), str):
                raise EvalError(
                    f"generator output for {p['id']} step {p['step']}: expected {{'text': str, ...}}, got {str(o)[:80]}"
                )
        outs += got
    return outs


def generate_predictions(
    refs: list[Reference],
    generate: Generator,
    mode: str = "teacher-forced",
    batch_size: int = 8,
    media_root: str | os.PathLike | None = None,
) -> list[dict]:
    """One ``--batch`` prediction per reference (same order); ``{"id", "not_run"}`` for a reference whose
    request could not run."""
    if mode not in MODES:
        raise EvalError(f"mode must be one of {MODES}, got {mode!r}")
    chains = [Chain(r, *split_reference(r.record)) for r in refs]
    if mode == "free":
        outs = _call(generate, [prompt_for(c, 0, mode, media_root) for c in chains], batch_size)
        return [
            {"id": c.ref.id, "not_run": str(o["not_run"])} if o.get("not_run") else {**o, "id": c.ref.id}
            for c, o in zip(chains, outs)
        ]
    k = 0
    while True:
        active = [c for c in chains if not c.done]
        if not active:
            break
        outs = _call(generate, [prompt_for(c, k, mode, media_root) for c in active], batch_size)
        for c, o in zip(active, outs):
            if o.get("not_run"):
                c.not_run, c.done = str(o["not_run"]), True
                continue
            step = read_step(o)
            c.steps.append(step)
            has_obs = k < len(c.gt) and c.gt[k][1] is not None
            c.done = step.name is None or not has_obs
        log.info("step %d: %d prompt(s)", k, len(active))
        k += 1
    return [assemble(c) for c in chains]
