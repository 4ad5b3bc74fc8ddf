"""ReAct text (GPT4Tools, VIoTGPT) <-> unified messages, byte for byte.

The text these systems train on and generate is a sequence of blocks::

    Thought: Do I need to use a tool? Yes
    Action: Edge Detection On Image
    Action Input: images/berdtnln.png
    Observation: image/ayffkvlr.png
    Thought: Do I need to use a tool? No
    AI: image/ayffkvlr.png

A *call block* (``Thought / Action / Action Input / Observation:``) becomes an assistant message with one
tool call ``{"name": Action, "arguments": {"input": <raw Action Input>}}`` followed by a ``tool`` message
holding the observation; the *final block* (``Thought / AI:``) becomes an assistant message whose content
is the answer. A thought other than GPT4Tools' default (``Do I need to use a tool? Yes`` / ``No``) is kept
in the assistant message's ``thought`` field.

Whitespace the sources do not agree on is a :class:`ReactStyle` (stored per record in
``meta["react"]``): what separates ``Observation:`` from the observation (``" "`` in GPT4Tools training
prompts, ``"\\n"`` in its validation outputs), what follows the last block (``"\\n"``, ``"\\n\\n"``, VIoT's
``" \\n"``), a ``Final Answer: `` prefix (VIoTGPT), and source spellings of tool names that were
normalised (VIoT aliases). With its style, :func:`format_messages` reproduces the source text exactly.

The renderer calls :func:`format_react_call`, :func:`format_react_observation` and
:func:`format_react_final` (names are stable). :func:`parse_react` is THE ReAct parser (it never raises):
the converters read source text with it (strictly: :func:`text_to_messages` proves the round trip), and
model output is read with it by everyone: the decode engine runs the call of a step ending at
``Observation:`` (:func:`react_action`), the scorers and the chat history read :func:`read_react`. Rules
for model text: a step is ``Thought: ...`` (optional in model text, listed as a problem) then ``Action:``
and ``Action Input:`` lines at the start of a line; the Action Input runs to the ``Observation:`` line;
surrounding whitespace is not part of a name or an input, and the tool receives the input without
surrounding double quotes (langchain's conversational agent, which GPT4Tools and VIoTGPT run).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_CALL_THOUGHT = "Do I need to use a tool? Yes"
DEFAULT_FINAL_THOUGHT = "Do I need to use a tool? No"
FINAL_ANSWER_PREFIX = "Final Answer: "

_BLOCK_START = re.compile(r"^(?:Thought:|Action:)", re.MULTILINE)
#: the model stops writing and the tool runs when its step ends with this line
REACT_STOP_RE = re.compile(r"(?:^|\n)Observation:[ \t]*$")  # $ also matches before a final newline
_WS = re.compile(r"[ \t\r\n]*")


# ------------------------------------------------------------------------------------------- style
@dataclass(frozen=True)
class ReactStyle:
    """Source layout details needed to reproduce a ReAct text exactly (defaults = GPT4Tools prompts).

    ``observation_sep`` is one separator for every observation or a list with one per tool message;
    ``end`` follows the last block (a final answer, or a call still waiting for its observation);
    ``final_prefix`` precedes the answer after ``AI: ``; ``names`` maps a normalised tool name to the
    spelling the source used.
    """

    observation_sep: str | tuple[str, ...] = " "
    end: str = "\n"
    final_prefix: str = ""
    names: dict[str, str] = field(default_factory=dict)

    def sep(self, index: int) -> str:
        if isinstance(self.observation_sep, str):
            return self.observation_sep
        return self.observation_sep[index] if index < len(self.observation_sep) else " "

    def to_meta(self) -> dict:
        """Only the fields that differ from the defaults (an empty dict for GPT4Tools-default text)."""
        out: dict = {}
        seps = self.observation_sep
        if isinstance(seps, tuple) and len(set(seps)) == 1:
            seps = seps[0]
        if seps != " " and seps != ():
            out["observation_sep"] = list(seps) if isinstance(seps, tuple) else seps
        if self.end != "\n":
            out["end"] = self.end
        if self.final_prefix:
            out["final_prefix"] = self.final_prefix
        if self.names:
            out["names"] = dict(self.names)
        return out

    @classmethod
    def from_meta(cls, meta: dict | None) -> ReactStyle:
        """Style of a record from its ``meta["react"]`` (or defaults)."""
        d = dict((meta or {}).get("react") or {})
        seps = d.get("observation_sep", " ")
        return cls(
            observation_sep=tuple(seps) if isinstance(seps, list) else seps,
            end=d.get("end", "\n"),
            final_prefix=d.get("final_prefix", ""),
            names=dict(d.get("names", {})),
        )


# ----------------------------------------------------------------------------------- formatting
def format_react_call(name: str, raw_input: str, thought: str | None = None) -> str:
    """The assistant's part of a call block, ending at ``Observation:`` (the model stops there)."""
    return (
        f"Thought: {thought or DEFAULT_CALL_THOUGHT}\nAction: {name}\nAction Input: {raw_input}\nObservation:"
    )


def format_react_observation(observation: str, sep: str = " ") -> str:
    """The tool's part of a call block: separator, observation, newline."""
    return f"{sep}{observation}\n"


def format_react_step(
    name: str,
    raw_input: str,
    observation: str | None = None,
    thought: str | None = None,
    sep: str = " ",
    end: str = "\n",
) -> str:
    """A whole call block; without an observation it ends with ``end`` (a pending call)."""
    call = format_react_call(name, raw_input, thought)
    return call + (end if observation is None else format_react_observation(observation, sep))


def format_react_final(answer: str, thought: str | None = None, prefix: str = "", end: str = "\n") -> str:
    """The final block: ``Thought: ...\\nAI: <prefix><answer><end>``."""
    return f"Thought: {thought or DEFAULT_FINAL_THOUGHT}\nAI: {prefix}{answer}{end}"


def call_input(arguments: dict) -> str:
    """The Action Input text of a call: the raw ReAct input, or the JSON arguments of other sources."""
    if set(arguments) == {"input"} and isinstance(arguments["input"], str):
        return arguments["input"]
    return json.dumps(arguments, ensure_ascii=False)


def format_messages(messages: list[dict], style: ReactStyle | None = None) -> str:
    """Assistant and tool messages (a tool-use episode) -> ReAct text. Other roles are not allowed."""
    style = style or ReactStyle()
    out: list[str] = []
    n_tool = 0
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "tool":
            out.append(format_react_observation(m["content"], style.sep(n_tool)))
            n_tool += 1
        elif m["role"] == "assistant" and m.get("tool_calls"):
            if len(m["tool_calls"]) != 1:
                raise ValueError(f"message {i}: ReAct has one call per step, got {len(m['tool_calls'])}")
            fn = m["tool_calls"][0]["function"]
            name = style.names.get(fn["name"], fn["name"])
            out.append(format_react_call(name, call_input(fn["arguments"]), m.get("thought")))
            if last:
                out.append(style.end)
        elif m["role"] == "assistant":
            end = style.end if last else "\n"
            out.append(format_react_final(m["content"], m.get("thought"), style.final_prefix, end))
        else:
            raise ValueError(f"message {i}: role {m['role']!r} has no ReAct form")
    return "".join(out)


# -------------------------------------------------------------------------------------- parsing
@dataclass
class ReactStep:
    """One call block. ``observation`` is None when the text stops after ``Observation:``."""

    thought: str
    action: str
    action_input: str
    observation: str | None = None
    sep: str = " "
    has_input: bool = True  # False: an 'Action:' without an 'Action Input:' line (nothing to run)


@dataclass
class ReactFinal:
    thought: str
    answer: str
    prefix: str = ""


@dataclass
class ReactParse:
    steps: list[ReactStep] = field(default_factory=list)
    final: ReactFinal | None = None
    end: str = "\n"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def style(self, names: dict[str, str] | None = None) -> ReactStyle:
        seps = tuple(s.sep for s in self.steps if s.observation is not None)
        return ReactStyle(
            observation_sep=seps if seps else " ",
            end=self.end,
            final_prefix=self.final.prefix if self.final else "",
            names=dict(names or {}),
        )


def _split_field(line: str, key: str) -> str | None:
    if line.startswith(key + " "):
        return line[len(key) + 1 :]
    if line.startswith(key):
        return line[len(key) :]
    return None


def _parse_call(k: int, lines: list[str], thought: str, last: bool, out: ReactParse) -> ReactStep:
    action = _split_field(lines[1], "Action:") or ""
    if len(lines) < 3 or _split_field(lines[2], "Action Input:") is None:
        out.problems.append(f"block {k}: 'Action:' without 'Action Input:'")
        return ReactStep(thought, action.strip(), "\n".join(lines[2:]), has_input=False)
    rest = "\n".join(lines[2:])[len("Action Input:") :]
    rest = rest[1:] if rest.startswith(" ") else rest
    cut = rest.find("\nObservation:")
    if cut < 0:  # a model stopped before the observation (langchain's stop word)
        return ReactStep(thought, action, rest[:-1] if rest.endswith("\n") and last else rest)
    step = ReactStep(thought, action, rest[:cut])
    body = rest[cut + len("\nObservation:") :]
    if last:  # earlier blocks already lost their terminating newline to the block split
        if body.strip(" \t\r\n") == "":
            out.end = body  # the text stops after "Observation:": the call waits for its result
            return step
        if body.endswith("\n"):
            body = body[:-1]
        else:
            out.problems.append(f"block {k}: observation not terminated by a newline")
    step.sep = _WS.match(body).group(0)
    step.observation = body[len(step.sep) :]
    return step


def _block_starts(text: str) -> list[int]:
    """Where blocks start: each ``Thought:`` line, and an ``Action:`` line not right after one."""
    starts: list[int] = []
    for m in _BLOCK_START.finditer(text):
        if text.startswith("Action:", m.start()):
            prev = text.rfind("\n", 0, max(m.start() - 1, 0)) + 1 if m.start() else 0
            if m.start() and text.startswith("Thought:", prev):
                continue  # the Action line of a Thought block
        starts.append(m.start())
    return starts


def parse_react(text: str) -> ReactParse:
    """Parse ReAct text into steps and an optional final answer. Never raises: problems are listed.

    Blocks start at lines beginning with ``Thought:`` (or ``Action:`` when no Thought line precedes it,
    a problem). A call block's observation runs to the next block;
    its leading whitespace is the separator. The final block's answer runs to the end of the text minus
    trailing newlines (kept as ``end``); a ``Final Answer: `` prefix is split off into ``prefix``.
    """
    out = ReactParse()
    if not isinstance(text, str):
        out.problems.append(f"ReAct text must be a string, got {type(text).__name__}")
        return out
    starts = _block_starts(text)
    if not starts:
        out.problems.append("no 'Thought:' block")
        return out
    if starts[0] > 0:
        out.problems.append(f"text before the first 'Thought:': {text[: starts[0]][:60]!r}")
    bounds = list(zip(starts, starts[1:] + [len(text)]))
    for k, (a, b) in enumerate(bounds):
        last = k == len(bounds) - 1
        block = text[a:b] if last else text[a : b - 1]  # drop the newline before the next block
        lines = block.split("\n")
        if lines[0].startswith("Action:"):  # model text may leave the Thought out
            out.problems.append(f"block {k}: 'Action:' without a 'Thought:' line")
            lines = ["", *lines]
        thought = _split_field(lines[0], "Thought:") or ""
        if out.final is not None:
            out.problems.append(f"block {k}: text after the final answer")
        if len(lines) > 1 and lines[1].startswith("Action:"):
            out.steps.append(_parse_call(k, lines, thought, last, out))
        elif len(lines) > 1 and lines[1].startswith("AI:"):
            answer = "\n".join(lines[1:])[len("AI:") :]
            answer = answer[1:] if answer.startswith(" ") else answer
            if last:
                stripped = answer.rstrip("\n")
                out.end, answer = answer[len(stripped) :], stripped
            prefix = FINAL_ANSWER_PREFIX if answer.startswith(FINAL_ANSWER_PREFIX) else ""
            out.final = ReactFinal(thought, answer[len(prefix) :], prefix)
        else:
            out.problems.append(f"block {k}: expected 'Action:' or 'AI:' after 'Thought:'")
    waiting = out.steps if out.final is not None else out.steps[:-1]
    for k, s in enumerate(waiting):
        if s.observation is None:
            out.problems.append(f"step {k}: no observation before the next step")
    return out


# --------------------------------------------------------------------------- messages from a parse
def _thought(value: str, default: str) -> dict:
    return {} if value == default else {"thought": value}


Normalize = Callable[[str, str], str]


def _normalizer(names: dict[str, str] | Normalize | None) -> Normalize:
    if callable(names):
        return names
    table = names or {}
    return lambda action, _input: table.get(action, action)


def parse_to_messages(
    parse: ReactParse, names: dict[str, str] | Normalize | None = None, train: bool = True
) -> list[dict]:
    """Unified assistant/tool messages for a parse. ``names`` normalises a source tool spelling (a dict, or
    a function of the spelling and the raw input: VIoT aliases); ``train=False`` marks context turns."""
    norm = _normalizer(names)
    flag = {} if train else {"train": False}
    msgs: list[dict] = []
    for s in parse.steps:
        name = norm(s.action, s.action_input)
        call = {"type": "function", "function": {"name": name, "arguments": {"input": s.action_input}}}
        msgs.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call],
                **_thought(s.thought, DEFAULT_CALL_THOUGHT),
                **flag,
            }
        )
        if s.observation is not None:
            msgs.append({"role": "tool", "name": call["function"]["name"], "content": s.observation})
    if parse.final is not None:
        f = parse.final
        msgs.append(
            {"role": "assistant", "content": f.answer, **_thought(f.thought, DEFAULT_FINAL_THOUGHT), **flag}
        )
    return msgs


def text_to_messages(
    text: str, names: dict[str, str] | Normalize | None = None, train: bool = True, where: str = "ReAct text"
) -> tuple[list[dict], ReactStyle]:
    """Strict conversion for data: the messages and style must format back to ``text`` exactly.

    ``names`` normalises tool names (source spelling -> canonical); the style remembers the spelling.
    Raises ValueError naming ``where`` when the text does not parse or does not round-trip."""
    parse = parse_react(text)
    if parse.problems:
        raise ValueError(f"{where}: not ReAct text: {'; '.join(parse.problems)}")
    norm = _normalizer(names)
    used = {norm(s.action, s.action_input): s.action for s in parse.steps}
    used = {k: v for k, v in used.items() if k != v}
    msgs = parse_to_messages(parse, norm, train)
    style = parse.style(used)
    back = format_messages(msgs, style)
    if back != text:
        i = next((k for k, (x, y) in enumerate(zip(back, text)) if x != y), min(len(back), len(text)))
        raise ValueError(
            f"{where}: ReAct text does not round-trip at char {i}: {text[max(0, i - 30) : i + 30]!r}"
        )
    return msgs, style


def concat_styles(*styles: ReactStyle) -> ReactStyle:
    """One record-level style for consecutive texts (a prompt's scratchpad, then the output): the
    observation separators in order, the last text's end and prefix, all name spellings."""
    seps: list[str] = []
    names: dict[str, str] = {}
    for s in styles:
        if isinstance(s.observation_sep, tuple):
            seps.extend(s.observation_sep)
        names.update(s.names)
    last = styles[-1]
    return ReactStyle(tuple(seps) if seps else " ", last.end, last.final_prefix, names)


# ------------------------------------------------------------------------------------ model output
def read_react(text: str) -> ReactParse:
    """Model output as ReAct: :func:`parse_react` of the text without its leading whitespace (a
    generation may start with the space that follows the prompt). Never raises."""
    return parse_react(text.lstrip(" \t\r\n") if isinstance(text, str) else text)


@dataclass
class ReactAction:
    """A call as the tool receives it: the Action name and its Action Input, stripped of surrounding
    whitespace (and, for the input, of surrounding double quotes)."""

    tool: str
    tool_input: str


def action_of(step: ReactStep) -> ReactAction | None:
    """The call of a parsed step, or None when it names no tool."""
    tool = step.action.strip()
    if not tool or not step.has_input:
        return None
    return ReactAction(tool, step.action_input.strip().strip('"').strip())


def react_calls(text: str) -> list[ReactAction]:
    """Every call of ReAct model text (what the engine ran, step by step, when it wrote it)."""
    return [a for a in (action_of(s) for s in read_react(text).steps) if a is not None]


def react_action(segment: str) -> ReactAction | None:
    """The call of one model step that ends with an ``Observation:`` line (the text since the last
    observation): what the engine runs. None when the step has no readable Action / Action Input."""
    if not isinstance(segment, str) or not REACT_STOP_RE.search(segment):
        return None
    parse = read_react(segment)
    if not parse.steps or parse.final is not None:
        return None
    last = parse.steps[-1]
    if last.observation is not None:
        return None
    return action_of(last)
