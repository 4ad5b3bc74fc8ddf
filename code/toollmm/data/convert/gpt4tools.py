"""GPT4Tools: ``{instruction, input, output}`` where ``instruction`` is the whole agent prompt (preamble,
tool list, ReAct format, previous conversation, new input, scratchpad of earlier steps) and ``output`` is
the next step(s). Validation / test records add ``Action``, ``Action Input``, ``user_input``, ``caption``,
``filename``, ``id``, ``finished_previously`` and carry multi-step chains with inline observations.

Template: AILab-CVC/GPT4Tools gpt4tools/data/generate_annoations.py (PROMPT_FORMAT, LLM_IMAGE_FORMAT,
conversation_to_complement). Mapping: preamble -> system message; tool list -> ``tools``; previous
conversation -> user/assistant context turns (``train: false``); new input -> user message; scratchpad ->
assistant/tool context turns; output -> supervised turns. :func:`to_source` rebuilds the source record
byte for byte (checked on every conversion)."""

from __future__ import annotations

import copy
import re

from ...core.react import ReactStyle, concat_styles, format_messages, text_to_messages
from .base import Context, leftovers, make_record, need, record_id, register, tool_spec

TOOLS_HEAD = "\nTOOLS:\n------\n\nGPT4Tools has access to the following tools:\n\n"
FORMAT = (
    "\n\nTo use a tool, please use the following format:\n\n```\nThought: Do I need to use a tool? Yes\n"
    "Action: the action to take, should be one of [{names}]\nAction Input: the input to the action\n"
    "Observation: the result of the action\n```\n\nWhen you have a response to say to the Human, or if you "
    "do not need to use a tool, you MUST use the format:\n\n```\nThought: Do I need to use a tool? No\n"
    "AI: [your response here]\n```\n\nFollow file name rules and do not fake non-existent file names. "
    "Remember to provide the image file name loyally from the last tool observation.\n\n"
    "Previous conversation:\n\n"
)
NEW_INPUT = "\n\nNew input: "
SUFFIX = (
    "\nGPT4Tools needs to use tools to observe images, not directly imagine them. Thoughts and observations "
    "in the conversation are only visible to GPT4Tools. When answering human questions, repeat important "
    "information. Let's think step by step.\n"
)
_HISTORY_TURN = re.compile(r"\n(?=(?:Human|AI): )")
EVAL_KEYS = ("Action", "Action Input", "user_input", "caption", "filename", "finished_previously")


def _parse_tools(block: str, ctx: Context) -> list[dict]:
    if not block.startswith("> "):
        raise ctx.fail("tool list does not start with '> '")
    tools = []
    for entry in block[2:].split("\n> "):
        name, sep, desc = entry.partition(": ")
        if not sep:
            raise ctx.fail(f"tool entry without 'name: description': {entry[:60]!r}")
        tools.append(tool_spec(name, desc))
    return tools


def _parse_history(history: str, ctx: Context) -> list[dict]:
    if not history:
        return []
    msgs = []
    for part in _HISTORY_TURN.split(history):
        role = "user" if part.startswith("Human: ") else "assistant"
        want = "user" if len(msgs) % 2 == 0 else "assistant"
        if role != want or not part.startswith(("Human: ", "AI: ")):
            raise ctx.fail(f"previous conversation is not alternating 'Human:'/'AI:' turns: {part[:60]!r}")
        text = part[len("Human: ") :] if role == "user" else part[len("AI: ") :]
        msgs.append(
            {"role": role, "content": text}
            if role == "user"
            else {"role": role, "content": text, "train": False}
        )
    return msgs


def _split_prompt(instruction: str, ctx: Context) -> dict:
    system, sep, rest = instruction.partition(TOOLS_HEAD)
    tools_block, sep2, rest = rest.partition("\n\nTo use a tool, please use the following format:")
    if not (sep and sep2):
        raise ctx.fail("instruction does not follow the GPT4Tools prompt template (no tool list)")
    _, sep, rest = rest.partition("Previous conversation:\n\n")
    history, sep2, rest = rest.partition(NEW_INPUT)
    user, sep3, scratch = rest.partition(SUFFIX)
    if not (sep and sep2 and sep3):
        raise ctx.fail(
            "instruction does not follow the GPT4Tools prompt template (no previous conversation / new input)"
        )
    return {
        "system": system,
        "tools": _parse_tools(tools_block, ctx),
        "history": history,
        "user": user,
        "scratch": scratch,
    }


def format_instruction(system: str, tools: list[dict], history: list[dict], user: str, scratch: str) -> str:
    """The GPT4Tools prompt for these parts (the inverse of the parse)."""
    names = [t["function"]["name"] for t in tools]
    tool_lines = "\n".join(
        f"> {t['function']['name']}: {t['function'].get('description', '')}" for t in tools
    )
    hist = "\n".join(("Human: " if m["role"] == "user" else "AI: ") + m["content"] for m in history)
    return (
        system
        + TOOLS_HEAD
        + tool_lines
        + FORMAT.format(names=", ".join(names))
        + hist
        + NEW_INPUT
        + user
        + SUFFIX
        + scratch
    )


def _split_style(style: ReactStyle, n_first: int) -> tuple[ReactStyle, ReactStyle]:
    seps = style.observation_sep
    a, b = (seps[:n_first], seps[n_first:]) if isinstance(seps, tuple) else (seps, seps)
    return ReactStyle(a, "\n", "", style.names), ReactStyle(b, style.end, style.final_prefix, style.names)


def to_source(record: dict) -> dict:
    """Rebuild ``{instruction, input, output}`` from a unified GPT4Tools record (byte for byte)."""
    msgs = record["messages"]
    u = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    j = next(
        i for i in range(u + 1, len(msgs)) if msgs[i]["role"] == "assistant" and msgs[i].get("train", True)
    )
    context, output = msgs[u + 1 : j], msgs[j:]
    ctx_style, out_style = _split_style(
        ReactStyle.from_meta(record.get("meta")), sum(m["role"] == "tool" for m in context)
    )
    scratch = format_messages(context, ctx_style) if context else ""
    instruction = format_instruction(
        msgs[0]["content"], record.get("tools", []), msgs[1:u], msgs[u]["content"], scratch
    )
    return {"instruction": instruction, "input": "", "output": format_messages(output, out_style)}


def _eval_split(ctx: Context) -> str | None:
    if ctx.opt("split"):
        return ctx.opt("split")
    stem = ctx.stem.lower()
    return "unseen" if "unseen" in stem else ("seen" if "seen" in stem else None)


@register(
    "gpt4tools",
    options={
        "split": "eval split name (default: seen/unseen from the file name)",
        "eval": "true: every record is an evaluation reference, also one with only id/instruction/output"
        " (what GPT4Tools' eval/evaluate_result.py reads); default: records with Action/user_input",
    },
)
def convert_gpt4tools(raw: dict, ctx: Context) -> list[dict]:
    """GPT4Tools training and validation/test records."""
    instruction, output = need(raw, "instruction", ctx), need(raw, "output", ctx)
    if raw.get("input"):
        raise ctx.fail("a non-empty 'input' is not part of the GPT4Tools format")
    parts = _split_prompt(instruction, ctx)
    history = _parse_history(parts["history"], ctx)
    try:
        context, ctx_style = (
            text_to_messages(parts["scratch"], train=False, where="instruction scratchpad")
            if parts["scratch"]
            else ([], ReactStyle())
        )
        supervised, out_style = text_to_messages(output, where="output")
    except ValueError as e:
        raise ctx.fail(str(e)) from e
    msgs = [
        {"role": "system", "content": parts["system"]},
        *history,
        {"role": "user", "content": parts["user"]},
        *context,
        *supervised,
    ]
    style = concat_styles(ctx_style, out_style)
    meta = {"prompt": "gpt4tools", **({"react": style.to_meta()} if style.to_meta() else {})}
    meta.update(leftovers(raw, {"instruction", "input", "output", "id", *EVAL_KEYS}))
    evaluation = None
    if any(k in raw for k in ("Action", "user_input")) or ctx.flag("eval"):
        evaluation = _eval_fields(raw, supervised, parts["user"], ctx, meta)
    rec = make_record(record_id(raw, ctx), ctx, msgs, tools=parts["tools"], eval=evaluation, meta=meta)
    back = to_source(rec)
    if back["instruction"] != instruction or back["output"] != output:
        key = "instruction" if back["instruction"] != instruction else "output"
        a, b = back[key], raw[key]
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise ctx.fail(
            f"{key} does not follow the GPT4Tools template at char {i}: {b[max(0, i - 40) : i + 40]!r}"
        )
    return [rec]


def _eval_fields(raw: dict, supervised: list[dict], user: str, ctx: Context, meta: dict) -> dict:
    """Reference chain (canonical calls of the supervised steps; [] = answer without a tool)."""
    calls = [copy.deepcopy(m["tool_calls"][0]["function"]) for m in supervised if m.get("tool_calls")]
    evaluation: dict = {"reference": calls}
    if _eval_split(ctx):
        evaluation["split"] = _eval_split(ctx)
    names = [c["name"] for c in calls]
    inputs = [[c["arguments"]["input"]] for c in calls]
    if raw.get("Action", names) != names or raw.get("Action Input", inputs) != inputs:
        meta["Action"], meta["Action Input"] = raw.get("Action"), raw.get("Action Input")
    if raw.get("user_input") is not None and raw["user_input"] != user:
        meta["user_input"] = raw["user_input"]
    for k in ("caption", "filename", "finished_previously"):
        if k in raw:
            meta[k] = raw[k]
    return evaluation
