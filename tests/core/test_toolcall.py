"""Canonical tool calls: one text per call, and a parser that never raises on model output."""

from __future__ import annotations

import json
import random
import re

import pytest

from toollmm.core.toolcall import (
    MAX_CALL_CHARS,
    canonical_call,
    canonical_json,
    parse_tool_call,
    tool_call_entry,
)


def test_canonical_json_is_name_first_sorted_compact_and_unicode():
    a = canonical_json(canonical_call("paint", {"z": 1, "a": {"y": [1, 2], "b": "é"}}))
    b = canonical_json(canonical_call("paint", {"a": {"b": "é", "y": [1, 2]}, "z": 1}))
    assert a == b == '{"name":"paint","arguments":{"a":{"b":"é","y":[1,2]},"z":1}}'
    # a record's tool_calls entry gives the same text as the bare call
    assert canonical_json(tool_call_entry("paint", {"z": 1})) == '{"name":"paint","arguments":{"z":1}}'
    assert canonical_json(canonical_call("Edge Detection On Image")) == (
        '{"name":"Edge Detection On Image","arguments":{}}'
    )


@pytest.mark.parametrize(
    "name,args,match",
    [
        ("", {}, "non-empty"),
        (3, {}, "non-empty"),
        ("x", [1], "JSON object"),
        ("x", {"f": {1, 2}}, "serialisable"),
    ],
)
def test_canonical_call_rejects_bad_input(name, args, match):
    with pytest.raises(ValueError, match=match):
        canonical_call(name, args)


def test_parse_round_trips_canonical_text_and_accepts_common_variants():
    call = canonical_call("count_objects", {"kind": "circle", "image": "a.png"})
    assert parse_tool_call(canonical_json(call)) == (call, None)
    spaced = ' \n{ "name" : "count_objects", "arguments": {"image": "a.png", "kind": "circle"} }\n'
    assert parse_tool_call(spaced) == (call, None)
    # arguments written as a JSON string (OpenAI style) or left out
    as_string = json.dumps(
        {"name": "count_objects", "arguments": json.dumps({"kind": "circle", "image": "a.png"})}
    )
    assert parse_tool_call(as_string) == (call, None)
    assert parse_tool_call('{"name": "unknown"}') == ({"name": "unknown", "arguments": {}}, None)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty"),
        ("not json", "not valid JSON"),
        ('{"name": "x", "arguments": {"a": 1}', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"arguments": {}}', "no name"),
        ('{"name": "", "arguments": {}}', "no name"),
        ('{"name": "x", "arguments": [1]}', "must be a JSON object"),
        ('{"name": "x", "arguments": "{oops"}', "arguments string is not JSON"),
        ('{"name": "x", "arguments": {}, "id": 3}', "unexpected keys"),
        ('{"name": "x", "arguments": {"v": NaN}}', "NaN"),
        (None, "must be a string"),
        ("[" * (MAX_CALL_CHARS + 1), "characters"),
        ("[" * 50_000, "nested too deeply"),  # deep nesting is reported before json.loads, not raised
    ],
)
def test_parse_reports_instead_of_raising(text, reason):
    call, err = parse_tool_call(text)
    assert call is None and err is not None
    assert re.search(reason, err), err


def test_parse_never_raises_on_random_model_output():
    rng = random.Random(0)
    alphabet = '{}[]":,\\ \nabcnamearguments0123456789.-eE<>/tool_call'
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        call, err = parse_tool_call(text)
        assert (call is None) != (err is None)
        if call is not None:  # whatever parses is canonical and re-parses to itself
            assert parse_tool_call(canonical_json(call)) == (call, None)
