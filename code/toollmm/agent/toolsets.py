"""Declared tool sets with their upstream names and descriptions, and the GPT4Tools prompt they render.

Sets (``inference.tool_sets``): ``builtin`` (the model's own generation / captioning / QA, bound by the
inference layer), ``gpt4tools`` (AILab-CVC/GPT4Tools, 24 tool names from 23 classes),
``gpt4tools_magicbrush`` (the tyshiwo1 fork's "Edit Image Using Text"), ``viotgpt`` (11 VIoTGPT tools,
plus the VIoT-Tool test files' names as aliases) and ``mllmtool`` (Hugging Face model ids). The upstream
sets' data lives in ``toolsets/*.json`` next to this file, each with a ``_provenance`` note. Tools with
their own code (the demo's, ``inference.tool_imports: [toollmm.demo.toolset]``, or a user's) come
through ``inference.tool_imports``, never through a set here.

Of the upstream tools only "Edge Detection On Image" has a real CPU backend here
(``builtin.edge_detection``, PIL); every other one answers "declared but has no backend" until someone
attaches one. Sets are declared in order and the first declaration of a name wins; tools from
``inference.tool_imports`` are registered before every set, so a same-named declared tool is skipped
(the demo's ``generate_image`` keeps its reference backend over the builtin one).

``registry_from_config`` builds a session's registry from the config (sets, ``inference.tool_imports``,
enabled names); it lives here, above ``registry``, so that the registry never imports the sets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .registry import Registry, ToolSpec
from .sandbox import Workspace

TOOLSET_DIR = Path(__file__).resolve().parent / "toolsets"
SETS = ("builtin", "gpt4tools", "gpt4tools_magicbrush", "viotgpt", "mllmtool")  # declared, upstream names

GPT4TOOLS_PREFIX = (
    "GPT4Tools can handle various text and visual tasks, such as answering questions and providing "
    "in-depth explanations and discussions. It generates human-like text and uses tools to indirectly "
    "understand images. When referring to images, GPT4Tools follows strict file name rules. To complete "
    "visual tasks, GPT4Tools uses tools and stays loyal to observation outputs. Users can provide new "
    "images to GPT4Tools with a description, but tools must be used for subsequent tasks.\n"
    "TOOLS:\n------\n\nGPT4Tools has access to the following tools:"
)
GPT4TOOLS_FORMAT = (
    "To use a tool, please use the following format:\n\n```\nThought: Do I need to use a tool? Yes\n"
    "Action: the action to take, should be one of [{tool_names}]\nAction Input: the input to the action\n"
    "Observation: the result of the action\n```\n\nWhen you have a response to say to the Human, or if "
    "you do not need to use a tool, you MUST use the format:\n\n```\nThought: Do I need to use a tool? No\n"
    "{ai_prefix}: [your response here]\n```\n"
)
GPT4TOOLS_SUFFIX = (
    "Follow file name rules and do not fake non-existent file names. Remember to provide the image file "
    "name loyally from the last tool observation.\n\nPrevious conversation:\n{chat_history}\n\n"
    "New input: {input}\nGPT4Tools needs to use tools to observe images, not directly imagine them. "
    "Thoughts and observations in the conversation are only visible to GPT4Tools. When answering human "
    "questions, repeat important information. Let's think step by step.\n{agent_scratchpad}"
)


def _schema(args: dict[str, str]) -> dict:
    props = {}
    for k, kind in args.items():
        if kind == "path":
            props[k] = {"type": "string", "format": "path", "minLength": 1, "maxLength": 1024}
        elif kind == "string":
            props[k] = {"type": "string", "maxLength": 4000}
        else:
            raise ValueError(f"tool set argument {k!r}: unknown kind {kind!r} (path|string)")
    return {"type": "object", "properties": props, "required": list(args), "additionalProperties": False}


def _spec(entry: dict, source: str) -> ToolSpec:
    return ToolSpec(
        name=entry["name"],
        description=entry["description"],
        parameters=_schema(entry["args"]),
        output=entry.get("output", "text"),
        source=source,
        react_args=list(entry["args"]),
        aliases=list(entry.get("aliases", [])),
    )


def load_toolset(name: str) -> list[ToolSpec]:
    """The declared specs of one set (no backends)."""
    if name == "builtin":
        from .builtin import builtin_specs

        return builtin_specs()
    path = TOOLSET_DIR / f"{name}.json"
    if name not in SETS or not path.is_file():
        raise ValueError(
            f"unknown tool set {name!r} (known: {', '.join(SETS)}); tools with code of their own come through "
            "inference.tool_imports, e.g. the demo's (stage folders saved with tool_sets [demo, ...]): "
            "inference.tool_sets=[builtin] inference.tool_imports=[toollmm.demo.toolset]"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        return [_spec(e, data["source"]) for e in data["tools"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed tool set ({type(e).__name__}: {e})") from None


def declare_sets(registry: Registry, names: Iterable[str]) -> None:
    """Declare each set in ``registry`` and attach the CPU backends this package ships."""
    from .builtin import attach_cpu_backends

    for name in names:
        for spec in load_toolset(name):
            if spec.name not in registry:
                registry.add(spec)
    attach_cpu_backends(registry)


def registry_from_config(cfg, workspace: str | Path | Workspace | None = None) -> Registry:
    """A session's registry from an ``InferenceConfig``: limits, declared sets, user imports, enabled names."""
    reg = Registry(
        workspace if workspace is not None else cfg.workspace,
        timeout_s=cfg.tool_timeout_s,
        max_output_chars=cfg.tool_max_output_chars,
        max_arg_chars=cfg.tool_max_arg_chars,
        max_arg_depth=cfg.tool_max_json_depth,
        enabled=list(cfg.tools),
    )
    for dotted in cfg.tool_imports:  # first: a declared set's tool of the same name is then skipped
        reg.import_path(dotted)
    declare_sets(reg, cfg.tool_sets)
    unknown = sorted(n for n in (reg.enabled or ()) if reg.get(n) is None)
    if unknown:
        raise ValueError(reg.unknown_names_message(unknown, cfg.tool_sets))
    if reg.enabled is not None:  # aliases (e.g. VIoT-Tool test-file names) enable the real tool
        reg.enabled = {reg.get(n).name for n in reg.enabled}
    return reg


def mllmtool_specs_from_records(records: Iterable[dict]) -> list[ToolSpec]:
    """Every MLLM-Tool model id answered in ``records`` (combined_data.json, *_tx2t.json) as a spec."""
    seen: dict[str, str] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"MLLM-Tool record #{i}: not an object")
        modality = rec.get("input_modality", "text")
        for turn in rec.get("conversations", []):
            if turn.get("from") != "gpt":
                continue
            value = turn.get("value")
            for tool_id in [value] if isinstance(value, str) else (value or []):
                if isinstance(tool_id, str) and tool_id and tool_id != "unknown":
                    seen.setdefault(tool_id, modality)
    entries = [
        {
            "name": n,
            "description": f"Hugging Face model {n} ({m} input)",
            "args": {"text": "string"} if m == "text" else {"input": "path"},
        }
        for n, m in seen.items()
    ]
    return [_spec(e, "mllmtool") for e in entries]


def render_tool_block(specs: Iterable[ToolSpec]) -> str:
    """``> Name: description`` lines, as langchain's conversational agent writes them."""
    return "\n".join(f"> {s.name}: {s.description}" for s in specs)


def render_tool_names(specs: Iterable[ToolSpec]) -> str:
    return ", ".join(s.name for s in specs)


def render_gpt4tools_prompt(
    specs: list[ToolSpec], chat_history: str = "", user_input: str = "", scratchpad: str = "", ai_prefix="AI"
) -> str:
    """The GPT4Tools instruction text (its released data's layout) for these tools."""
    fmt = GPT4TOOLS_FORMAT.format(tool_names=render_tool_names(specs), ai_prefix=ai_prefix)
    suffix = GPT4TOOLS_SUFFIX.format(chat_history=chat_history, input=user_input, agent_scratchpad=scratchpad)
    return f"{GPT4TOOLS_PREFIX}\n\n{render_tool_block(specs)}\n\n{fmt}\n{suffix}"


def gpt4tools_header(specs: list[ToolSpec]) -> str:
    """The fixed part of the GPT4Tools instruction, up to and including 'Previous conversation:\\n'."""
    full = render_gpt4tools_prompt(specs)
    return full[: full.index("Previous conversation:\n") + len("Previous conversation:\n")]
