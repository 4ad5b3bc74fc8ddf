"""Chat templates as data, and the one function that lays a conversation out as text parts.

``conversation_parts`` turns messages into ``Part``s (text, supervised?, kind). The renderer tokenises the
joined text once and labels each token by the part it came from; the Jinja chat template
(``toollmm.data.chat_template``) is generated from the same ``ChatFormat`` constants and writes the same
text, so ``tokenizer.apply_chat_template`` gives the renderer's ids.

Layout (``vicuna_v1``; v0 swaps the role strings and ends turns with ``\\n###`` as PandaGPT/NExT-GPT did)::

    <s> {system} USER: {user} ASSISTANT: {assistant}[IMG0]..[IMG3]</s>USER: ...

An assistant turn is supervised from the space before its text up to and including the turn end; a turn
that calls tools writes ``<tool_call>{canonical json}</tool_call>``, the tool message follows masked as
``<tool_result>{content}</tool_result>`` and the next assistant message continues the same turn.
With ``tool_format: react`` (and a record that declares tools or calls one) the calls are written as
GPT4Tools / VIoTGPT ReAct text instead, with the source whitespace the converters kept in
``meta.react`` (see ``ReactStyle``), so the assistant turn is the source text byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from toollmm.core.errors import UserError
from toollmm.core.tokens import TOOL_CALL_END, TOOL_CALL_START, TOOL_RESULT_END, TOOL_RESULT_START

from ..core.react import DEFAULT_CALL_THOUGHT as REACT_YES  # noqa: F401  (re-exported for the Jinja template)
from ..core.react import DEFAULT_FINAL_THOUGHT as REACT_NO  # noqa: F401
from ..core.toolcall import canonical_json

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TOOL_FORMATS = ("tokens", "react")


class FormatError(UserError, ValueError):
    """A conversation the chosen format cannot express (the renderer names the record)."""


@dataclass(frozen=True)
class TemplateSpec:
    """The literal strings of one chat template."""

    name: str
    system_prefix: str  # between <s> and the system prompt
    system_suffix: str  # after the system prompt
    user_first: str  # before the first user message (and any user message not after an assistant turn)
    user_next: str  # before a user message that follows a finished assistant turn
    user_suffix: str  # after a user message
    assistant_header: str  # masked; also the generation prompt
    turn_end: str | None  # supervised end of an assistant turn; None = the tokenizer's eos token
    stop_strings: tuple[str, ...] = ()  # text that ends a generated turn besides the eos token


TEMPLATES: dict[str, TemplateSpec] = {
    # FastChat's vicuna_v1.1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." (LLaVA conv_vicuna_v1)
    "vicuna_v1": TemplateSpec("vicuna_v1", " ", "", " USER: ", "USER: ", "", " ASSISTANT:", None),
    # PandaGPT / NExT-GPT / MLLM-Tool: "### Human: {q}\n### Assistant: {a}\n###" (they use no system prompt)
    "vicuna_v0": TemplateSpec(
        "vicuna_v0", " ", "\n", "### Human: ", " Human: ", "\n", "### Assistant:", "\n###", ("###",)
    ),
}


@dataclass(frozen=True)
class ChatFormat:
    """Everything that fixes the rendered text: template, special-token strings, system prompt, tool format."""

    template: TemplateSpec
    signal_text: dict[str, str]  # modality -> full signal span, e.g. "[IMG0][IMG1][IMG2][IMG3]"
    eos_token: str
    bos_token: str | None = None
    system_prompt: str = VICUNA_SYSTEM
    tool_format: str = "tokens"

    @classmethod
    def build(cls, template: str, contract, tokenizer, *, system_prompt=VICUNA_SYSTEM, tool_format="tokens"):
        from toollmm.core.tokens import MODALITIES

        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
        if tool_format not in TOOL_FORMATS:
            raise ValueError(f"unknown tool_format {tool_format!r}; known: {list(TOOL_FORMATS)}")
        if not tokenizer.eos_token:
            raise ValueError("the tokenizer has no eos token; the chat template ends turns with it")
        return cls(
            TEMPLATES[template],
            {m: contract.signal_text(m) for m in MODALITIES},
            tokenizer.eos_token,
            tokenizer.bos_token or None,
            system_prompt or "",
            tool_format,
        )

    @property
    def turn_end(self) -> str:
        return self.template.turn_end if self.template.turn_end is not None else self.eos_token


@dataclass(frozen=True)
class Part:
    text: str
    train: bool  # supervised (label = id) or masked
    kind: str  # "template" | "content" (record text) | "signal" | "turn_end"
    generate: dict[str, Any] | None = field(default=None, compare=False)  # the `generate` entry of a signal


# ------------------------------------------------------------------------------------------- ReAct
# The ReAct text of one step comes from toollmm.core.react (the converters' module, which parses source
# text into messages and proves the round trip byte-exact): one definition for parsing and rendering.
from ..core.react import ReactStyle  # noqa: E402
from ..core.react import call_input as react_call_input  # noqa: E402
from ..core.react import format_react_call as react_call_text  # noqa: E402
from ..core.react import format_react_final as react_final_text  # noqa: E402
from ..core.react import format_react_observation as react_observation_text  # noqa: E402


def uses_tools(messages: list[dict[str, Any]], tools: list | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def _react_assistant_text(m: dict, style: ReactStyle, last: bool) -> str:
    calls = m.get("tool_calls") or []
    if not calls:
        return react_final_text(
            m["content"], m.get("thought"), style.final_prefix, style.end if last else "\n"
        )
    if len(calls) != 1 or m["content"]:
        raise FormatError(
            "ReAct text holds exactly one tool call and no other text per assistant message "
            f"(got {len(calls)} call(s){' and content' if m['content'] else ''})"
        )
    fn = calls[0]["function"]
    name = style.names.get(fn["name"], fn["name"])
    text = react_call_text(name, react_call_input(fn.get("arguments") or {}), m.get("thought"))
    return text + (style.end if last else "")


# ------------------------------------------------------------------------------------------ layout
@dataclass
class _State:
    react: bool
    style: ReactStyle
    tool_index: int = 0


def _assistant_parts(m: dict, fmt: ChatFormat, st: _State, after_tool: bool, nxt: str | None) -> list[Part]:
    train = m.get("train", True) is not False
    lead = "" if (st.react and after_tool) else " "
    out: list[Part] = []
    if st.react:
        out.append(Part(lead + _react_assistant_text(m, st.style, nxt is None), train, "content"))
    elif m["content"]:
        out.append(Part(lead + m["content"], train, "content"))
    for g in m.get("generate") or []:
        out.append(Part(fmt.signal_text[g["modality"]], train, "signal", g))
    if not st.react:
        for c in m.get("tool_calls") or []:
            out += [
                Part(TOOL_CALL_START, train, "template"),
                Part(canonical_json(c), train, "content"),
                Part(TOOL_CALL_END, train, "template"),
            ]
    if nxt != "tool":
        out.append(Part(fmt.turn_end, train, "turn_end"))
    return out


def _tool_parts(m: dict, st: _State) -> list[Part]:
    if st.react:
        st.tool_index += 1
        return [Part(react_observation_text(m["content"], st.style.sep(st.tool_index - 1)), False, "content")]
    return [
        Part(TOOL_RESULT_START, False, "template"),
        Part(m["content"], False, "content"),
        Part(TOOL_RESULT_END, False, "template"),
    ]


def conversation_parts(
    messages: list[dict[str, Any]],
    fmt: ChatFormat,
    *,
    tools: list | None = None,
    meta: dict | None = None,
    add_generation_prompt: bool = False,
) -> list[Part]:
    """The conversation as text parts (empty parts dropped); the text is ``"".join(p.text for p in parts)``.

    ``tools`` and ``meta`` are the record's (ReAct form needs declared tools or a call, and ``meta.react``).
    """
    t = fmt.template
    st = _State(fmt.tool_format == "react" and uses_tools(messages, tools), ReactStyle.from_meta(meta))
    parts: list[Part] = []
    if fmt.bos_token:
        parts.append(Part(fmt.bos_token, False, "template"))
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else fmt.system_prompt
    if system:
        parts += [
            Part(t.system_prefix, False, "template"),
            Part(system, False, "content"),
            Part(t.system_suffix, False, "template"),
        ]
    prev = None
    for i, m in enumerate(messages):
        role = m["role"]
        nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
        if role == "system":
            continue
        if role == "user":
            parts.append(Part(t.user_next if prev == "assistant" else t.user_first, False, "template"))
            parts += [Part(m["content"], False, "content"), Part(t.user_suffix, False, "template")]
        elif role == "assistant":
            if prev == "user":
                parts.append(Part(t.assistant_header, False, "template"))
            parts += _assistant_parts(m, fmt, st, prev == "tool", nxt)
        elif role == "tool":
            parts += _tool_parts(m, st)
        else:
            raise FormatError(f"messages[{i}]: unknown role {role!r}")
        prev = role
    if add_generation_prompt:
        if prev == "assistant":
            raise FormatError("add_generation_prompt: the conversation already ends with an assistant turn")
        if prev == "user":
            parts.append(Part(t.assistant_header, False, "template"))
    return [p for p in parts if p.text]
