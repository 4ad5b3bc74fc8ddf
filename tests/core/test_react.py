"""ReAct text: parsing, formatting, and the byte-exact round trip on every tool record of the samples."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from toollmm.core.react import (
    REACT_STOP_RE,
    ReactAction,
    ReactStyle,
    format_messages,
    format_react_call,
    format_react_final,
    format_react_observation,
    format_react_step,
    parse_react,
    react_action,
    react_calls,
    text_to_messages,
)
from toollmm.data.convert import convert_file
from toollmm.data.convert.gpt4tools import to_source
from toollmm.data.convert.viot import normalize_tool

FIX = Path(__file__).parents[1] / "fixtures"
GPT4TOOLS = ["samples/gpt4tools/gpt4tools_71k.json", "samples/gpt4tools/gpt4tools_val_seen.json"]
VIOT_CHAINS = [f"samples/viot/test_{n}.json" for n in ("action", "anomaly", "crowd", "fire", "licenceplate")]
VIOT_UPLOAD = [f"samples/viot/test_{n}.json" for n in ("face", "personreid", "vehiclereid")]


def _convert(fmt: str, rel: str, tmp_path: Path) -> tuple[list[dict], list[dict]]:
    out = tmp_path / (Path(rel).stem + ".jsonl")
    convert_file(fmt, FIX / rel, out)
    src_path = FIX / rel
    if src_path.read_text(encoding="utf-8").lstrip().startswith("["):
        src = json.loads(src_path.read_text(encoding="utf-8"))
    else:
        src = [json.loads(line) for line in src_path.read_text(encoding="utf-8").splitlines()]
    return src, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("rel", GPT4TOOLS)
def test_gpt4tools_records_render_back_byte_for_byte(rel, tmp_path):
    src, records = _convert("gpt4tools", rel, tmp_path)
    assert len(src) == len(records)
    for raw, rec in zip(src, records):
        back = to_source(rec)
        assert back["instruction"].encode() == raw["instruction"].encode()
        assert back["output"].encode() == raw["output"].encode()
        # the supervised turns alone are the output text
        u = max(i for i, m in enumerate(rec["messages"]) if m["role"] == "user")
        out = [m for m in rec["messages"][u + 1 :] if m.get("train", True) or m["role"] == "tool"]
        first = next(i for i, m in enumerate(out) if m["role"] == "assistant" and m.get("train", True))
        style = ReactStyle.from_meta(rec.get("meta"))
        n_ctx_tools = sum(m["role"] == "tool" for m in out[:first])
        seps = style.observation_sep
        out_style = ReactStyle(
            seps[n_ctx_tools:] if isinstance(seps, tuple) else seps, style.end, style.final_prefix
        )
        assert format_messages(out[first:], out_style) == raw["output"]


@pytest.mark.parametrize("rel", VIOT_CHAINS)
def test_viot_chain_strings_render_back_byte_for_byte(rel, tmp_path):
    src, records = _convert("viot", rel, tmp_path)
    for raw, rec in zip(src, records):
        text = format_messages(rec["messages"][1:], ReactStyle.from_meta(rec.get("meta")))
        assert text.encode() == raw["chains"].encode()


@pytest.mark.parametrize("rel", VIOT_UPLOAD)
def test_viot_upload_records_keep_the_source_action(rel, tmp_path):
    src, records = _convert("viot", rel, tmp_path)
    for raw, rec in zip(src, records):
        fn = rec["messages"][-1]["tool_calls"][0]["function"]
        names = ReactStyle.from_meta(rec.get("meta")).names
        assert names.get(fn["name"], fn["name"]) == raw["action"]
        assert fn["arguments"] == {"input": raw["action_input"]}


def test_viot_step_list_and_training_records_round_trip(tmp_path):
    src, records = _convert("viot", "samples/viot/test_gait.json", tmp_path)
    names = ReactStyle.from_meta(records[0].get("meta")).names
    steps = []
    msgs = records[0]["messages"]
    for m, t in zip(msgs[1::2], msgs[2::2]):
        fn = m["tool_calls"][0]["function"]
        steps.append(
            {
                "thought": m.get("thought", "Do I need to use a tool? Yes"),
                "action": names.get(fn["name"], fn["name"]),
                "action_input": fn["arguments"]["input"],
                "observation": t["content"],
            }
        )
    assert steps == src[0]["chains"]
    src, records = _convert("viot", "upstream/viot/viot_tool_train.json", tmp_path)
    text = format_messages(records[0]["messages"][1:], ReactStyle.from_meta(records[0]["meta"]))
    assert text == src[0]["conversations"][1]["value"]


def test_format_functions_write_the_gpt4tools_layout():
    assert format_react_call("Edge Detection On Image", "a.png") == (
        "Thought: Do I need to use a tool? Yes\nAction: Edge Detection On Image\nAction Input: a.png\nObservation:"
    )
    assert format_react_observation("b.png") == " b.png\n"
    assert format_react_observation("b.png", sep="\n") == "\nb.png\n"
    assert (
        format_react_step("X", "in", "out")
        == "Thought: Do I need to use a tool? Yes\nAction: X\nAction Input: in\nObservation: out\n"
    )
    assert (
        format_react_step("X", "in")
        == "Thought: Do I need to use a tool? Yes\nAction: X\nAction Input: in\nObservation:\n"
    )
    assert format_react_final("done") == "Thought: Do I need to use a tool? No\nAI: done\n"
    assert format_react_final("ok", "Do I need to use a tool? No.", "Final Answer: ", "") == (
        "Thought: Do I need to use a tool? No.\nAI: Final Answer: ok"
    )


def test_non_string_arguments_are_written_as_json():
    msgs = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
        }
    ]
    assert 'Action Input: {"x": 1}\nObservation:\n' in format_messages(msgs)


def test_parse_reads_steps_final_and_layout():
    text = "Thought: t1\nAction: A\nAction Input: a, b\nObservation:\nres 1\nThought: Do I need to use a tool? No.\nAI: Final Answer: yes\n\n"
    p = parse_react(text)
    assert p.ok
    assert [(s.thought, s.action, s.action_input, s.observation, s.sep) for s in p.steps] == [
        ("t1", "A", "a, b", "res 1", "\n")
    ]
    assert (p.final.thought, p.final.answer, p.final.prefix, p.end) == (
        "Do I need to use a tool? No.",
        "yes",
        "Final Answer: ",
        "\n\n",
    )


def test_parse_of_model_output_stopped_before_observation():
    p = parse_react("Thought: Do I need to use a tool? Yes\nAction: Segment the Image\nAction Input: x.png")
    assert p.ok and p.steps[0].observation is None and p.steps[0].action_input == "x.png" and p.final is None


@pytest.mark.parametrize(
    "text,problem",
    [
        ("", "no 'Thought:' block"),
        ("I think so", "no 'Thought:' block"),
        ("hello\nThought: x\nAI: y", "text before the first 'Thought:'"),
        ("Thought: x\nsomething else", "expected 'Action:' or 'AI:'"),
        ("Thought: x\nAction: A\nno input", "'Action:' without 'Action Input:'"),
        ("Thought: x\nAction: A\nAction Input: i\nThought: y\nAI: z", "no observation before the next step"),
        ("Thought: x\nAI: done\nThought: y\nAI: again", "text after the final answer"),
        ("Thought: x\nAction: A\nAction Input: i\nObservation: cut", "not terminated by a newline"),
    ],
)
def test_parse_reports_problems_instead_of_raising(text, problem):
    p = parse_react(text)
    assert not p.ok and any(problem in q for q in p.problems), p.problems


def test_parse_never_raises_on_truncated_or_mangled_text():
    base = json.loads((FIX / GPT4TOOLS[1]).read_text(encoding="utf-8"))[0]["output"]
    rng = random.Random(0)
    samples = [base[:k] for k in range(len(base) + 1)]
    for _ in range(300):
        chars = list(base)
        for _ in range(5):
            chars[rng.randrange(len(chars))] = rng.choice(["\n", ":", " ", "Thought:", "AI:", "x", ""])
        samples.append("".join(chars))
    for text in samples:
        p = parse_react(text)
        assert isinstance(p.problems, list)


def test_model_text_without_a_thought_line_is_read_but_is_not_data():
    """Model text: the engine and the scorers read the step (langchain's rule); data: a problem."""
    text = 'Action: A\nAction Input:  "in put" \nObservation:'
    p = parse_react(text)
    assert [(s.action, s.action_input) for s in p.steps] == [("A", ' "in put" ')]
    assert any("without a 'Thought:' line" in q for q in p.problems)
    assert react_action(text) == ReactAction("A", "in put") and react_calls(text) == [
        ReactAction("A", "in put")
    ]
    with pytest.raises(ValueError, match="not ReAct text"):
        text_to_messages(text + " out\n")
    # the step ends at an "Observation:" line of its own; an indented one is text, not a stop
    assert REACT_STOP_RE.search("Action: A\nAction Input: i\nObservation:")
    assert not REACT_STOP_RE.search("Action: A\nAction Input: i\n  Observation:")
    assert react_action("Thought: t\nAction: A\nObservation:") is None  # no Action Input: nothing to run


def test_text_to_messages_names_the_text_it_cannot_represent():
    with pytest.raises(ValueError, match="chains: not ReAct text"):
        text_to_messages("Thought: x\nAction: A\nAction Input: i\nObservation: cut", where="chains")


def test_style_meta_round_trip_and_defaults():
    style = ReactStyle(
        ("\n", "\n"), "\n\n", "Final Answer: ", {"Count People in the Video": "Crowd Counting"}
    )
    meta = style.to_meta()
    assert meta == {
        "observation_sep": "\n",
        "end": "\n\n",
        "final_prefix": "Final Answer: ",
        "names": {"Count People in the Video": "Crowd Counting"},
    }
    back = ReactStyle.from_meta({"react": meta})
    assert (back.sep(0), back.sep(1), back.end, back.final_prefix, back.names) == (
        "\n",
        "\n",
        "\n\n",
        "Final Answer: ",
        style.names,
    )
    assert ReactStyle().to_meta() == {}
    assert ReactStyle.from_meta({"react": {"observation_sep": [" ", "\n"]}}).sep(1) == "\n"


def test_tool_aliases_text_round_trips_with_canonical_names():
    text = "Thought: Do I need to use a tool? Yes.\nAction: Crowd Counting\nAction Input: video/a.mp4\nObservation: 3\n"
    msgs, style = text_to_messages(text, names=normalize_tool)
    assert msgs[0]["tool_calls"][0]["function"]["name"] == "Count People in the Video"
    assert msgs[1] == {"role": "tool", "name": "Count People in the Video", "content": "3"}
    assert format_messages(msgs, style) == text


def test_vehicle_plate_alias_depends_on_its_argument():
    assert (
        normalize_tool("Recognize the Vehicle Plate", "皖AX239T,video/Hefei.mp4")
        == "Recognize the Vehicle by Plate Number"
    )
    assert (
        normalize_tool("Recognize the Vehicle Plate", "{query_upload_img_path},video/a.mp4")
        == "Recognize the Vehicle by Appearance"
    )
    assert (
        normalize_tool("Recognize the Vehicle Plate", "image/x.png,video/a.mp4")
        == "Recognize the Vehicle by Appearance"
    )
    assert normalize_tool("Detect the Human Pose", "video/a.mp4") == "Detect the Human Pose"
