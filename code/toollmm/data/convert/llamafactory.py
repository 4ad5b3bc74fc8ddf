"""LLaMA-Factory dataset files, read through their ``dataset_info.json`` description
(hiyouga/LLaMA-Factory data/README.md): ``formatting`` sharegpt (``columns.messages`` with role tags,
``system``, ``tools``, ``images``, ``videos``, ``audios``; tool calls as ``function_call`` turns whose value
is ``{"name", "arguments"}`` JSON, results as ``observation`` turns) or alpaca (``prompt``, ``query``,
``response``, ``history``, ``system``, media columns). The description is found with
``--opt dataset_info=PATH`` (default: ``dataset_info.json`` next to the input) and ``--opt dataset=NAME``
(default: the entry whose ``file_name`` is the input's name); without one the layout is guessed
(``messages`` with role/content, ``conversations`` with from/value, else alpaca columns)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from toollmm.core.errors import read_text
from toollmm.core.tokens import MODALITIES
from toollmm.core.toolcall import call_from_value

from .base import (
    Context,
    ConversionError,
    attach_media,
    leftovers,
    make_record,
    record_id,
    register,
    tool_call,
    tool_spec,
)

SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}


@lru_cache(maxsize=8)
def _load_info(path: str) -> dict:
    return json.loads(read_text(path))


def dataset_description(ctx: Context) -> dict:
    """The dataset_info.json entry for the input file ({} when there is none)."""
    info_path = Path(ctx.opt("dataset_info") or ctx.path.parent / "dataset_info.json")
    if not info_path.is_file():
        if ctx.opt("dataset_info") or ctx.opt("dataset"):
            raise ConversionError(f"{ctx.path}: dataset_info.json not found at {info_path}")
        return {}
    info = _load_info(str(info_path))
    name = ctx.opt("dataset")
    if name is not None:
        if name not in info:
            raise ConversionError(f"{info_path}: no dataset {name!r} (has {sorted(info)[:20]})")
        return info[name]
    matches = [d for d in info.values() if isinstance(d, dict) and d.get("file_name") == ctx.path.name]
    return matches[0] if len(matches) == 1 else {}


def _call_from(value: str, ctx: Context) -> list[dict]:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as e:
        raise ctx.fail(f"function_call value is not JSON: {e.msg}") from e
    calls = data if isinstance(data, list) else [data]
    out = []
    for c in calls:
        call, err = call_from_value(c)  # the rules every tool call is read by (toollmm.core.toolcall)
        if call is None:
            raise ctx.fail(f"function_call {value[:80]!r}: {err}")
        out.append(tool_call(call["name"], call["arguments"]))
    return out


def _tools(value, ctx: Context) -> list[dict]:
    if value in (None, "", "[]", []):
        return []
    specs = json.loads(value) if isinstance(value, str) else value
    if not isinstance(specs, list):
        raise ctx.fail("tools must be a JSON list")
    return [tool_spec(s["name"], s.get("description"), s.get("parameters")) for s in specs]


def _sharegpt(raw: dict, desc: dict, ctx: Context) -> tuple[list[dict], set[str]]:
    cols = desc.get("columns", {})
    tags = {**SHAREGPT_TAGS, **desc.get("tags", {})}
    key = cols.get("messages", "conversations")
    turns = raw.get(key)
    if not isinstance(turns, list) or not turns:
        raise ctx.fail(f"missing or empty message list {key!r}")
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "call",
        tags["system_tag"]: "system",
    }
    msgs: list[dict] = []
    system = raw.get(cols["system"]) if cols.get("system") else None
    if system:
        msgs.append({"role": "system", "content": system})
    last_calls: list[dict] = []
    for i, t in enumerate(turns):
        role = roles.get(t.get(tags["role_tag"])) if isinstance(t, dict) else None
        content = t.get(tags["content_tag"]) if isinstance(t, dict) else None
        if role is None or not isinstance(content, str):
            raise ctx.fail(f"{key}[{i}]: unknown role or non-string content: {str(t)[:80]}")
        if role == "call":
            last_calls = _call_from(content, ctx)
            msgs.append({"role": "assistant", "content": "", "tool_calls": last_calls})
        elif role == "tool":
            msg = {"role": "tool", "content": content}
            if len(last_calls) == 1:
                msg["name"] = last_calls[0]["function"]["name"]
            msgs.append(msg)
        else:
            msgs.append({"role": role, "content": content})
    return msgs, {key, cols.get("system", "")}


def _alpaca(raw: dict, desc: dict, ctx: Context) -> tuple[list[dict], set[str]]:
    cols = {**ALPACA_COLUMNS, **desc.get("columns", {})}
    prompt, query, response = (raw.get(cols[k]) for k in ("prompt", "query", "response"))
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ctx.fail(f"alpaca record needs string {cols['prompt']!r} and {cols['response']!r}")
    msgs: list[dict] = []
    if cols.get("system") and raw.get(cols["system"]):
        msgs.append({"role": "system", "content": raw[cols["system"]]})
    for pair in raw.get(cols.get("history", ""), None) or []:
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = prompt + ("\n" + query if query else "")  # LLaMA-Factory: "instruction\ninput"
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return msgs, {cols[k] for k in ("prompt", "query", "response")} | {
        cols.get("system", ""),
        cols.get("history", ""),
    }


OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def _guess_description(raw: dict) -> dict:
    """Without a dataset_info.json entry: openai-style ``messages``, sharegpt ``conversations``, else alpaca."""
    if isinstance(raw.get("messages"), list):
        return {"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": OPENAI_TAGS}
    if "conversations" in raw:
        return {"formatting": "sharegpt"}
    return {"formatting": "alpaca"}


@register(
    "llamafactory",
    options={
        "dataset_info": "path of dataset_info.json (default: next to the input)",
        "dataset": "dataset name in dataset_info.json (default: the entry whose file_name is the input)",
    },
)
def convert_llamafactory(raw: dict, ctx: Context) -> list[dict]:
    """LLaMA-Factory sharegpt / openai / alpaca files (multimodal, tool calls)."""
    if not isinstance(raw, dict):
        raise ctx.fail(f"expected a JSON object, got {type(raw).__name__}")
    desc = dataset_description(ctx) or _guess_description(raw)
    cols = desc.get("columns", {})
    if desc.get("formatting", "alpaca") == "sharegpt":
        msgs, used = _sharegpt(raw, desc, ctx)
    else:
        msgs, used = _alpaca(raw, desc, ctx)
    media = {}
    for m in MODALITIES:
        key = cols.get(m + "s", m + "s")
        paths = raw.get(key) or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        media[m + "s"] = attach_media(msgs, m, paths, ctx)
        used.add(key)
    tools_key = cols.get("tools", "tools")
    tools = _tools(raw.get(tools_key), ctx)
    meta = leftovers(raw, used | {tools_key, "id"})
    return [make_record(record_id(raw, ctx), ctx, msgs, tools=tools, meta=meta, **media)]
