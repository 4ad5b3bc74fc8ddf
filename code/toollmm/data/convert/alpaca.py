"""Alpaca: ``{instruction, input, output}`` (tatsu-lab/stanford_alpaca README 'Data Release'). The user
turn is the instruction, then a blank line and the input when there is one (the prompt in train.py
PROMPT_DICT puts the input in its own section)."""

from __future__ import annotations

from .base import Context, leftovers, make_record, need, record_id, register


@register("alpaca")
def convert_alpaca(raw: dict, ctx: Context) -> list[dict]:
    """Alpaca instruction / input / output records."""
    instruction = need(raw, "instruction", ctx)
    extra = raw.get("input") or ""
    if not isinstance(extra, str):
        raise ctx.fail(f"key 'input': expected str, got {type(extra).__name__}")
    output = need(raw, "output", ctx)
    user = instruction + ("\n\n" + extra if extra else "")
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    meta = leftovers(raw, {"instruction", "input", "output"})
    return [make_record(record_id(raw, ctx), ctx, msgs, meta=meta)]
