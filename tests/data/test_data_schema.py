"""The unified record schema: documented examples are valid, each class of problem is caught and named."""

from __future__ import annotations

import copy
import json
import re

import pytest

from toollmm.core.paths import DATA_DIR
from toollmm.core.toolcall import tool_call_entry
from toollmm.data.records import RecordError, check_record, ensure_valid, load_jsonl, validate_record


def readme_examples() -> list[dict]:
    """The ```json records of data/README.md's "Worked examples" section."""
    text = (DATA_DIR / "README.md").read_text()
    section = text.split("## Worked examples", 1)[1].split("\n## ", 1)[0]
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", section, re.S)]


def base() -> dict:
    return {
        "id": "r1",
        "source": "test",
        "images": ["a.png"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\ncount the circles"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [tool_call_entry("count", {"kind": "circle"})],
            },
            {"role": "tool", "name": "count", "content": "3"},
            {
                "role": "assistant",
                "content": "Three.",
                "generate": [{"modality": "image", "caption": "3 circles"}],
            },
        ],
    }


def test_readme_examples_are_valid_and_cover_each_kind():
    examples = readme_examples()
    assert len(examples) >= 4
    for r in examples:
        assert validate_record(r, where="data/README.md") == []
    kinds = {
        "image chat": any(r.get("images") and "eval" not in r for r in examples),
        "tool call + result": any(any(m["role"] == "tool" for m in r["messages"]) for r in examples),
        "generate": any(any(m.get("generate") for m in r["messages"]) for r in examples),
        "eval": any(r.get("eval", {}).get("acceptable") for r in examples),
    }
    assert all(kinds.values()), kinds
    assert validate_record(base()) == []


def _bad(mutate) -> list[str]:
    r = base()
    mutate(r)
    return validate_record(r, where="f.jsonl:7")


def _msgs(r):
    return r["messages"]


CASES = {
    # schema
    "missing messages": (lambda r: r.pop("messages"), r"'messages' is a required property"),
    "unknown key": (lambda r: r.update(extra=1), r"\(record\): Additional properties.*'extra'"),
    "bad role": (lambda r: _msgs(r)[1].update(role="human"), r"messages\[1\]\.role: 'human' is not one of"),
    "generate without target": (
        lambda r: _msgs(r)[4].update(generate=[{"modality": "image"}]),
        r"messages\[4\]\.generate\[0\]: .*'caption' is a required property; or 'embedding' is a required",
    ),
    "bad modality": (
        lambda r: _msgs(r)[4].update(generate=[{"modality": "smell", "caption": "x"}]),
        r"generate\[0\]\.modality: 'smell' is not one of",
    ),
    "arguments not an object": (
        lambda r: _msgs(r)[2]["tool_calls"][0]["function"].update(arguments="{}"),
        r"tool_calls\[0\]\.function\.arguments: '\{\}' is not of type 'object'",
    ),
    # placeholders
    "too few images": (
        lambda r: r.update(images=[]),
        r"1 <image> placeholder\(s\) .* but 0 entries in `images`",
    ),
    "unlisted video": (lambda r: r.update(videos=["v.mp4"]), r"0 <video> placeholder\(s\) .* but 1 entry"),
    "placeholder in assistant": (
        lambda r: _msgs(r)[4].update(content="<audio> three"),
        r"messages\[4\] \(assistant\): input placeholders <audio>",
    ),
    # fields by role
    "tool_calls on user": (
        lambda r: _msgs(r)[1].update(tool_calls=[tool_call_entry("x")]),
        r"messages\[1\] \(user\): `tool_calls` is only allowed on assistant",
    ),
    "name on assistant": (
        lambda r: _msgs(r)[4].update(name="x"),
        r"messages\[4\] \(assistant\): `name` is only allowed on tool",
    ),
    "train on tool": (lambda r: _msgs(r)[3].update(train=False), r"messages\[3\] \(tool\): `train` is only"),
    # role order
    "starts with assistant": (
        lambda r: _msgs(r).pop(1) and r.update(images=[]),
        r"messages\[1\] \(assistant\): the conversation must start with a user message",
    ),
    "user after user": (
        lambda r: _msgs(r).insert(2, {"role": "user", "content": "and?"}),
        r"messages\[2\] \(user\): expected assistant after user",
    ),
    "tool without a call": (
        lambda r: _msgs(r)[2].pop("tool_calls"),
        r"messages\[3\] \(tool\): a tool message must answer a tool call",
    ),
    "call not answered": (
        lambda r: _msgs(r).pop(3),
        r"messages\[3\] \(assistant\): the assistant's tool call\(s\) still await 1 tool message",
    ),
    "system not first": (
        lambda r: _msgs(r).append({"role": "system", "content": "late"}),
        r"messages\[5\]: a system message may only come first",
    ),
    # raw special tokens in text
    "signal token in text": (
        lambda r: _msgs(r)[4].update(content="Three [IMG0]"),
        r"messages\[4\]\.content: raw special token \[IMG0\]",
    ),
    "tool token in user text": (
        lambda r: _msgs(r)[1].update(content="<image> <tool_call>"),
        r"messages\[1\]\.content: raw special token <tool_call>",
    ),
    "tool token in arguments": (
        lambda r: _msgs(r)[2]["tool_calls"][0]["function"]["arguments"].update(kind="</tool_result>"),
        r"messages\[2\]\.tool_calls\[0\]: raw special token </tool_result>",
    ),
    "signal token in thought": (
        lambda r: _msgs(r)[2].update(thought="[AUD3]"),
        r"messages\[2\]\.thought: raw special token \[AUD3\]",
    ),
    # supervision
    "nothing to train on": (
        lambda r: [m.update(train=False) for m in _msgs(r) if m["role"] == "assistant"],
        r"no assistant turn to train on",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_problem_is_caught_and_names_the_record(case):
    mutate, pattern = CASES[case]
    problems = _bad(mutate)
    assert problems, f"{case}: not caught"
    assert all(p.startswith("f.jsonl:7: record 'r1': ") for p in problems), problems
    assert any(re.search(pattern, p) for p in problems), problems


def test_eval_only_records_need_no_assistant_turn():
    r = base()
    r["messages"] = r["messages"][:2]
    assert [p.reason for p in check_record(r)] == ["empty_conversation"]
    r["eval"] = {"acceptable": ["count"]}
    assert check_record(r) == []
    with pytest.raises(RecordError, match=r"x:1: record 'r1': 1 <image> .* but 3 entries"):
        ensure_valid({**r, "images": ["a", "b", "c"]}, where="x:1")


def test_load_jsonl_raises_naming_file_line_and_id(tmp_path):
    p = tmp_path / "d.jsonl"
    bad = base()
    bad["id"] = "broken"
    bad["images"] = []
    p.write_text(json.dumps(base()) + "\n\n" + json.dumps(bad) + "\n")
    it = iter(load_jsonl(p))
    assert next(it)["id"] == "r1"
    with pytest.raises(RecordError, match=rf"{re.escape(str(p))}:3: record 'broken': 1 <image>") as e:
        next(it)
    assert e.value.record_id == "broken" and e.value.reason == "media_mismatch"


def test_load_jsonl_skip_counts_per_reason(tmp_path):
    p = tmp_path / "d.jsonl"
    good = base()
    second = {**base(), "id": "r2"}
    no_img = {**base(), "id": "r3", "images": []}
    wrong_role = copy.deepcopy({**base(), "id": "r4"})
    wrong_role["messages"][1]["role"] = "bot"
    lines = [json.dumps(good), "{not json", json.dumps(second), json.dumps(good), json.dumps(no_img)]
    lines.append(json.dumps(wrong_role))
    p.write_text("\n".join(lines) + "\n")
    records = load_jsonl(p, on_error="skip")
    assert [r["id"] for r in records] == ["r1", "r2"]
    assert records.read == 2
    assert dict(records.skipped) == {
        "malformed_json": 1,
        "duplicate_id": 1,
        "media_mismatch": 1,
        "invalid_record": 1,
    }
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(p, on_error="ignore")
