"""One parser decides, for everyone: the same model text driven through the decode engine (what it runs)
and through the scorers (what they count as a call) gives the same verdict and the same call.

Token format on the real runtime (``toollmm.load`` of a tiny stage folder, the real decode step model
steered to write each text); the oversize cases, which a 1024-position tiny model cannot write, and the
ReAct cases on the real ``Engine`` with a scripted step model and a real tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

import toollmm
from inference_fixtures import steer
from toollmm.agent.engine import Engine
from toollmm.agent.registry import Registry
from toollmm.agent.scripted import ScriptedModel
from toollmm.agent.toolsets import SETS, declare_sets
from toollmm.core.config import InferenceConfig
from toollmm.core.tokens import TokenContract
from toollmm.core.toolcall import MAX_CALL_CHARS, UNREAD, parse_tool_call
from toollmm.eval.mllm_tool import predicted_id
from toollmm.eval.run import read_step
from toollmm.eval.toolcalls import calls_from_prediction, first_tool_call, input_text
from toollmm.infer.output import output_dict
from toollmm.infer.requests import prompt_request

ARGS = '{"a": 2, "b": 3, "op": "add"}'
#: (text between <tool_call> and </tool_call>, parsed?) -- the verdict both sides must reach
TOKEN_CASES = [
    ('{"name": "calculator", "arguments": ' + ARGS + "}", True),
    ('{"type": "function", "function": {"name": "calculator", "arguments": ' + ARGS + "}}", True),  # wrapper
    ('{"function": {"name": "calculator", "arguments": ' + ARGS + "}}", True),
    ('{"name": "calculator", "arguments": "{\\"a\\": 2, \\"b\\": 3, \\"op\\": \\"add\\"}"}', True),  # OpenAI
    ('{"name": "calculator"}', True),  # parsed; the registry refuses the missing arguments
    ('{"name": "teleport", "arguments": {}}', True),  # parsed; an unknown tool is not run
    ('{"name": "calculator", "arguments": ' + '{"a": ' * 12 + "1" + "}" * 12 + "}", True),  # too deep to RUN
    ('{"name": "calculator", "parameters": ' + ARGS + "}", False),  # alias: a tool definition's key
    ('{"name": "calculator", "arguments": ' + ARGS + ', "id": "call_1"}', False),  # extra key
    ('{"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": {}}}', False),
    ('{"type": "tool", "function": {"name": "calculator", "arguments": {}}}', False),
    ('{"name": "calculator", "arguments": [1, 2]}', False),
    ('{"name": "calculator", "arguments": ' + ARGS, False),  # not JSON
    ('{"name": "", "arguments": {}}', False),
]


def engine_calls(out: dict) -> list[tuple[str, object]]:
    """What the engine read (``UNREAD``: it could not read a call, so it ran nothing)."""
    return [(c["name"], c["arguments"]) for c in out["tool_calls"] if c["name"] != UNREAD]


def scorer_views(out: dict, raw_text: str) -> dict[str, list]:
    """The call(s) each scorer path reads from the same generation."""
    call, _ = first_tool_call(raw_text)  # the demo metric and the MLLM-Tool scorer read raw text
    step = read_step(out)  # the teacher-forced benchmark driver reads the --batch output
    return {
        "raw text": [] if call is None else [(call["name"], input_text(call["arguments"]))],
        "raw text, all spans": calls_from_prediction({"text": raw_text}),
        "--batch output": calls_from_prediction(out),
        "read_step": [] if step.name is None else [(step.name, step.input)],
        "mllm_tool": [] if predicted_id(out) is None else [(predicted_id(out), None)],
    }


def assert_agree(out: dict, raw_text: str, parsed: bool, text: str) -> None:
    """The engine read a call exactly when every scorer path reads one, and they read the same call (the
    ``--batch`` views read what the engine reported, the text views read the text)."""
    ran = engine_calls(out)
    call, _ = parse_tool_call(text)
    text = text[:200]  # for the messages
    assert bool(ran) == parsed, (text, out["tool_calls"])
    from_text = [] if call is None else [(call["name"], input_text(call["arguments"]))]
    reported = [(n, input_text(a)) for n, a in ran]
    assert [n for n, _ in reported] == [n for n, _ in from_text]
    for (_, shown), (_, written) in zip(reported, from_text):
        assert shown in (written, "(too deep to show)")  # the registry does not echo refused deep args
    views = scorer_views(out, raw_text)
    assert views["raw text"] == views["raw text, all spans"] == from_text, (text, views)
    assert views["--batch output"] == views["read_step"] == reported, (text, views)
    assert [n for n, _ in views["mllm_tool"]] == [n for n, _ in reported], (text, views)


@pytest.fixture(scope="module")
def rt(tiny_stage_dir, tmp_path_factory):
    runtime = toollmm.load(tiny_stage_dir, output_dir=tmp_path_factory.mktemp("agreement_out"))
    rules = [(f"case{k:02d}", f"<tool_call>{text}</tool_call> ok") for k, (text, _) in enumerate(TOKEN_CASES)]
    return steer(runtime, rules)


def test_engine_and_scorers_read_the_same_calls_on_the_real_runtime(rt):
    requests = [prompt_request(f"case{k:02d}") for k in range(len(TOKEN_CASES))]
    outs, rows = rt.run_rows(requests)
    for (text, parsed), out, row in zip(TOKEN_CASES, outs, rows):
        assert len(out["tool_calls"]) == 1 and f"<tool_call>{text}</tool_call>" in row.raw_text, text
        assert_agree(out, row.raw_text, parsed, text)
        assert (parse_tool_call(text)[0] is not None) == parsed, text  # the table says what the rules say
        c = out["tool_calls"][0]
        if not parsed:
            assert c["error"].startswith("malformed tool call"), c
    by_text = {t: o["tool_calls"][0] for (t, _), o in zip(TOKEN_CASES, outs)}
    assert by_text[TOKEN_CASES[0][0]]["result"] == '{"result": 5}'  # the canonical call really ran
    assert by_text[TOKEN_CASES[1][0]]["result"] == '{"result": 5}'  # and so did the record form
    assert "unknown tool 'teleport'" in by_text[TOKEN_CASES[5][0]]["error"]  # parsed, not run
    assert "nested too deeply" in by_text[TOKEN_CASES[6][0]]["error"]  # parsed, refused by the registry


# ------------------------------------------------------------------- engine + scripted model
@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    TokenContract().add_to(t)
    t.add_tokens([AddedToken("Z" * 1000, normalized=False, special=False)])  # long call text, few tokens
    return t


@pytest.fixture()
def reg(tmp_path):
    r = Registry(tmp_path / "ws", timeout_s=20)
    declare_sets(r, SETS)

    @r.tool(description="echo raw text", isolation="inprocess")
    def echo(text: str) -> str:
        return text

    return r


def generate(tok, reg, body: str, tool_format: str = "tokens"):
    script = tok.encode(body, add_special_tokens=False) + [tok.eos_token_id]
    model = ScriptedModel([script], len(tok), tok.eos_token_id)
    cfg = InferenceConfig(max_new_tokens=600, tool_max_call_tokens=600)
    eng = Engine(model, tok, reg, cfg, tool_format=tool_format)
    [res] = eng.generate([tok.encode("USER: hi ASSISTANT:", add_special_tokens=False)])
    return output_dict(res, [], 0.0, 0.0), res


@pytest.mark.parametrize("blocks, parsed", [(98, True), (101, False)])
def test_the_size_limit_is_one_constant_for_engine_and_scorers(tok, reg, blocks, parsed):
    text = '{"name": "echo", "arguments": {"text": "' + "Z" * 1000 * blocks + '"}}'
    out, res = generate(tok, reg, f"<tool_call>{text}</tool_call> ok")
    seen = res.raw_text[
        res.raw_text.index("<tool_call>") + len("<tool_call>") : res.raw_text.index("</tool_call>")
    ]
    assert (len(seen) <= MAX_CALL_CHARS) == parsed  # the engine saw a text on this side of the limit
    assert_agree(out, res.raw_text, parsed, text)
    err = out["tool_calls"][0]["error"]
    # parsed: the registry refuses arguments over inference.tool_max_arg_chars (nothing runs); not parsed:
    # the text itself is over the limit
    assert ("arguments too large" in err) if parsed else (f"limit {MAX_CALL_CHARS}" in err), err


REACT_CASES = [
    ("Thought: Do I need to use a tool? Yes\nAction: echo\nAction Input: hi\nObservation:", "hi"),
    ("Action: echo\nAction Input: hi there\nObservation:", "hi there"),  # no Thought line
    ('Thought: Do I need to use a tool? Yes\nAction: echo\nAction Input:  "quoted" \nObservation:', "quoted"),
    ("Thought: Do I need to use a tool? Yes\nAction: echo\nAction Input: a\nmore\nObservation:", "a\nmore"),
    ("Thought: Do I need to use a tool? Yes\nAction: echo\nObservation:", None),  # no Action Input
    ("Thought: Do I need to use a tool? Yes\n  Action: echo\n  Action Input: hi\nObservation:", None),
    ("Thought: I will just observe\nObservation:", None),
]


@pytest.mark.parametrize("step, expected", REACT_CASES)
def test_react_steps_are_read_alike_by_engine_and_scorers(tok, reg, step, expected):
    out, res = generate(tok, reg, step + "\nThought: Do I need to use a tool? No\nAI: done", "react")
    assert len(out["tool_calls"]) == 1, out
    ran = engine_calls(out)
    assert ran == ([] if expected is None else [("echo", expected)]), out["tool_calls"]
    if expected is not None:
        assert out["tool_calls"][0]["result"] == expected  # the tool really ran on that input
    want = [(n, a) for n, a in ran]
    assert calls_from_prediction({"text": res.text}) == want  # the scorers' view of the model's text
    assert calls_from_prediction(out) == want  # and of the --batch output
    step_read = read_step({"text": res.text})
    assert ([] if step_read.name is None else [(step_read.name, step_read.input)]) == want
