"""The Jinja chat template shipped with toollmm's tokenizer: same text as ``conversation_parts``.

``install_chat_template`` sets ``tokenizer.chat_template`` (``save_pretrained`` writes it to
``chat_template.jinja``), so ``tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"))``
gives the Python renderer's ids. The template writes each ``<image>/<video>/<audio>`` placeholder once, as
the text has it; the renderer expands placeholder ``i`` of modality ``m`` into ``media_tokens[m]`` copies, so
compare after ``expand_placeholders`` (``toollmm.data.render``). Supervised text is wrapped in
``{% generation %}`` blocks: ``return_assistant_tokens_mask=True`` marks the tokens the renderer labels.
Template kwargs: ``tool_format`` ("tokens" | "react") overrides the installed default; ``meta`` (the
record's) gives ReAct text its source whitespace (``meta.react``). Pass the record's ``tools`` too.
"""

from __future__ import annotations

import json
import re

from toollmm.core.tokens import TOOL_CALL_END, TOOL_CALL_START, TOOL_RESULT_END, TOOL_RESULT_START

from .templates import REACT_NO, REACT_YES, VICUNA_SYSTEM, ChatFormat

_HEADER_RE = re.compile(r"^\{#- toollmm-chat-template (\{.*?\}) -#\}")


def _lit(s: str) -> str:
    """A Jinja string literal for ``s`` (Jinja decodes backslash escapes; non-ASCII may stay raw)."""
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\n").replace("\r", "\\r")
    return f'"{s}"'


def _dict_lit(d: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_lit(k)}: {_lit(v)}" for k, v in d.items()) + "}"


_BODY = r"""
{%- set fmt = tool_format if tool_format is defined else @DEFAULT_FORMAT@ -%}
{%- set signal = @SIGNAL@ -%}
{%- set turn_end = @TURN_END@ -%}
{%- set ns = namespace(react=false, prev="", system=@SYSTEM@, tool_i=0) -%}
{%- set rs = meta["react"] if (meta is defined and meta and meta["react"]) else {} -%}
{%- set rs_sep = rs["observation_sep"] if rs["observation_sep"] is defined else " " -%}
{%- set rs_end = rs["end"] if rs["end"] is defined else "\n" -%}
{%- set rs_prefix = rs["final_prefix"] if rs["final_prefix"] is defined else "" -%}
{%- set rs_names = rs["names"] if rs["names"] else {} -%}
{%- if fmt == "react" -%}
  {%- if tools -%}{%- set ns.react = true -%}{%- endif -%}
  {%- for m in messages -%}
    {%- if m["role"] == "tool" or m["tool_calls"] -%}{%- set ns.react = true -%}{%- endif -%}
  {%- endfor -%}
{%- endif -%}
{%- if messages and messages[0]["role"] == "system" -%}{%- set ns.system = messages[0]["content"] -%}{%- endif -%}
{%- if bos_token -%}{{- bos_token -}}{%- endif -%}
{%- if ns.system -%}{{- @SYS_PREFIX@ ~ ns.system ~ @SYS_SUFFIX@ -}}{%- endif -%}
{%- for m in messages -%}
  {%- set role = m["role"] -%}
  {%- if role == "user" -%}
    {{- (@USER_NEXT@ if ns.prev == "assistant" else @USER_FIRST@) ~ m["content"] ~ @USER_SUFFIX@ -}}
  {%- elif role == "assistant" -%}
    {%- if ns.prev == "user" -%}{{- @HEADER@ -}}{%- endif -%}
    {%- set calls = m["tool_calls"] or [] -%}
    {%- set lead = "" if (ns.react and ns.prev == "tool") else " " -%}
    {%- set out = namespace(s="") -%}
    {%- if ns.react -%}
      {%- if calls -%}
        {%- if calls | length != 1 or m["content"] -%}
          {{- raise_exception("ReAct text holds exactly one tool call and no other text per assistant message") -}}
        {%- endif -%}
        {%- set fn = calls[0]["function"] -%}
        {%- set args = fn["arguments"] or {} -%}
        {%- if args | length == 1 and args["input"] is string -%}
          {%- set action_input = args["input"] -%}
        {%- else -%}
          {%- set action_input = args | tojson -%}
        {%- endif -%}
        {%- set name = rs_names[fn["name"]] if fn["name"] in rs_names else fn["name"] -%}
        {%- set out.s = lead ~ "Thought: " ~ (m["thought"] or @REACT_YES@) ~ "\nAction: " ~ name ~ "\nAction Input: " ~ action_input ~ "\nObservation:" ~ (rs_end if loop.last else "") -%}
      {%- else -%}
        {%- set out.s = lead ~ "Thought: " ~ (m["thought"] or @REACT_NO@) ~ "\nAI: " ~ rs_prefix ~ m["content"] ~ (rs_end if loop.last else "\n") -%}
      {%- endif -%}
    {%- elif m["content"] -%}
      {%- set out.s = lead ~ m["content"] -%}
    {%- endif -%}
    {%- for g in m["generate"] or [] -%}{%- set out.s = out.s ~ signal[g["modality"]] -%}{%- endfor -%}
    {%- if not ns.react -%}
      {%- for c in calls -%}
        {%- set args = c["function"]["arguments"] or {} -%}
        {%- set out.s = out.s ~ @CALL_START@ ~ '{"name":' ~ (c["function"]["name"] | tojson) ~ ',"arguments":' ~ (args | tojson(sort_keys=true, separators=(",", ":"))) ~ "}" ~ @CALL_END@ -%}
      {%- endfor -%}
    {%- endif -%}
    {%- if loop.nextitem is not defined or loop.nextitem["role"] != "tool" -%}{%- set out.s = out.s ~ turn_end -%}{%- endif -%}
    {%- if m["train"] is defined and m["train"] == false -%}
      {{- out.s -}}
    {%- else -%}
      {%- generation -%}{{- out.s -}}{%- endgeneration -%}
    {%- endif -%}
  {%- elif role == "tool" -%}
    {%- if ns.react -%}
      {%- set sep = rs_sep if rs_sep is string else (rs_sep[ns.tool_i] if ns.tool_i < rs_sep | length else " ") -%}
      {%- set ns.tool_i = ns.tool_i + 1 -%}
      {{- sep ~ m["content"] ~ "\n" -}}
    {%- else -%}{{- @RESULT_START@ ~ m["content"] ~ @RESULT_END@ -}}{%- endif -%}
  {%- elif role != "system" -%}
    {{- raise_exception("unknown role " ~ role) -}}
  {%- endif -%}
  {%- if role != "system" -%}{%- set ns.prev = role -%}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {%- if ns.prev == "assistant" -%}
    {{- raise_exception("add_generation_prompt: the conversation already ends with an assistant turn") -}}
  {%- elif ns.prev == "user" -%}
    {{- @HEADER@ -}}
  {%- endif -%}
{%- endif -%}
"""


def chat_template_source(fmt: ChatFormat) -> str:
    """The Jinja source for ``fmt`` (bos/eos come from the tokenizer at render time, as in HF templates)."""
    t = fmt.template
    values = {
        "DEFAULT_FORMAT": _lit(fmt.tool_format),
        "SIGNAL": _dict_lit(fmt.signal_text),
        "TURN_END": "eos_token" if t.turn_end is None else _lit(t.turn_end),
        "SYSTEM": _lit(fmt.system_prompt),
        "SYS_PREFIX": _lit(t.system_prefix),
        "SYS_SUFFIX": _lit(t.system_suffix),
        "USER_FIRST": _lit(t.user_first),
        "USER_NEXT": _lit(t.user_next),
        "USER_SUFFIX": _lit(t.user_suffix),
        "HEADER": _lit(t.assistant_header),
        "REACT_YES": _lit(REACT_YES),
        "REACT_NO": _lit(REACT_NO),
        "CALL_START": _lit(TOOL_CALL_START),
        "CALL_END": _lit(TOOL_CALL_END),
        "RESULT_START": _lit(TOOL_RESULT_START),
        "RESULT_END": _lit(TOOL_RESULT_END),
    }
    body = re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], _BODY)
    info = json.dumps({"template": t.name, "tool_format": fmt.tool_format}, sort_keys=True)
    return "{#- toollmm-chat-template " + info + " -#}\n" + body


def install_chat_template(
    tokenizer,
    template_name: str,
    token_contract,
    *,
    tool_format: str = "tokens",
    system_prompt: str = VICUNA_SYSTEM,
) -> str:
    """Set ``tokenizer.chat_template`` to toollmm's template (the contract's tokens must be in the tokenizer)."""
    token_contract.ids(tokenizer)  # raises naming any missing token
    fmt = ChatFormat.build(
        template_name, token_contract, tokenizer, system_prompt=system_prompt, tool_format=tool_format
    )
    tokenizer.chat_template = chat_template_source(fmt)
    return tokenizer.chat_template


def chat_template_info(tokenizer) -> dict | None:
    """``{"template": ..., "tool_format": ...}`` when the tokenizer carries toollmm's template, else None."""
    src = getattr(tokenizer, "chat_template", None)
    m = _HEADER_RE.match(src) if isinstance(src, str) else None
    return json.loads(m.group(1)) if m else None
