"""What the inference layer adds to the decode engine, with a scripted model on a real tokenizer: the
per-call token callback (streaming), per-call signal hook, and stopping at the first tool call without
running it (token format and ReAct)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from toollmm.agent.engine import Engine
from toollmm.agent.registry import Registry
from toollmm.agent.scripted import ScriptedModel
from toollmm.core.config import InferenceConfig
from toollmm.core.tokens import TokenContract
from toollmm.data.templates import TEMPLATES
from toollmm.infer.output import TextStream


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    TokenContract().add_to(t)
    return t


@pytest.fixture()
def ran():
    return []


@pytest.fixture()
def reg(tmp_path, ran):
    r = Registry(tmp_path / "ws")

    @r.tool(description="upper-case", isolation="inprocess")
    def shout(text: str) -> str:
        ran.append(text)
        return text.upper()

    return r


def engine(tok, reg, scripts, tool_format="tokens", **kw):
    brackets = (tok.convert_tokens_to_ids("<tool_result>"), tok.convert_tokens_to_ids("</tool_result>"))
    model = ScriptedModel(scripts, len(tok), tok.eos_token_id, forced_brackets=brackets)
    return Engine(model, tok, reg, InferenceConfig(max_new_tokens=120), tool_format=tool_format, **kw)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_token_callback_streams_every_appended_token_and_visible_text(tok, reg):
    script = enc(tok, 'ok <tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call> done') + [
        tok.eos_token_id
    ]
    eng = engine(tok, reg, [script, enc(tok, "second row") + [tok.eos_token_id]])
    got: dict[int, list[int]] = {}
    deltas: dict[int, str] = {}
    stream = TextStream(tok, eng.visible_ids, lambda r, d: deltas.__setitem__(r, deltas.get(r, "") + d))

    def on_tokens(row, ids):
        got.setdefault(row, []).extend(ids)
        stream(row, ids)

    results = eng.generate([enc(tok, "USER: a ASSISTANT:")] * 2, on_tokens=on_tokens)
    assert [got[i] for i in (0, 1)] == [r.token_ids for r in results]  # forced tool result included
    assert [deltas[i] for i in (0, 1)] == [r.text for r in results]  # calls and results never shown
    assert "HI" not in deltas[0] and results[0].tool_results[0].result == "HI"


def test_signal_hook_per_call_overrides_the_engine_default(tok, reg):
    ids = TokenContract().ids(tok)
    script = list(ids.signal["image"]) + [tok.eos_token_id]
    default, per_call = [], []
    eng = engine(tok, reg, [script], signal_hook=lambda **kw: default.append(kw) or "a")
    [res] = eng.generate(
        [enc(tok, "USER: a ASSISTANT:")], signal_hook=lambda **kw: per_call.append(kw) or "b"
    )
    assert default == [] and len(per_call) == 1 and res.signals[0].result == "b"


def test_stop_at_tool_call_reports_the_call_without_running_it(tok, reg, ran):
    call = '<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>'
    script = enc(tok, "first " + call + " after") + [tok.eos_token_id]
    eng = engine(tok, reg, [script, script])
    stopped, free = eng.generate([enc(tok, "USER: a ASSISTANT:")] * 2, stop_at_tool_call=[True, False])
    assert stopped.finish_reason == "tool_call" and stopped.raw_text.endswith("</tool_call>")
    [r] = stopped.tool_results
    assert (r.name, r.arguments, r.result, r.error) == ("shout", {"text": "hi"}, None, None)
    assert free.finish_reason == "eos" and free.tool_results[0].result == "HI" and ran == ["hi"]
    broken = enc(tok, '<tool_call>{"name": "shout", </tool_call> x') + [tok.eos_token_id]
    [res] = engine(tok, reg, [broken]).generate([enc(tok, "USER: a ASSISTANT:")], stop_at_tool_call=True)
    assert res.finish_reason == "tool_call" and "malformed tool call" in res.errors[0]
    with pytest.raises(ValueError, match="2 flags for 1 prompts"):
        eng.generate([enc(tok, "x")], stop_at_tool_call=[True, False])


def test_stop_at_tool_call_in_react_form(tok, reg, ran):
    step = "Thought: Do I need to use a tool? Yes\nAction: shout\nAction Input: hello\nObservation:"
    script = (
        enc(tok, step) + enc(tok, " HELLO\nThought: Do I need to use a tool? No\nAI: hi") + [tok.eos_token_id]
    )
    [res] = engine(tok, reg, [script], tool_format="react").generate(
        [enc(tok, "USER: a ASSISTANT:")], stop_at_tool_call=True
    )
    assert res.finish_reason == "tool_call" and res.text.endswith("Observation:") and ran == []
    assert (res.tool_results[0].name, res.tool_results[0].arguments) == ("shout", "hello")


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_each_template_ends_the_turn_at_its_own_turn_end(tok, reg, template):
    """The model writes the template's turn end and then runs on into an invented next turn: the row ends
    at the turn end (EOS, or a declared stop string such as vicuna_v0's ``###``), and neither the stop
    string nor the invented turn is in the answer or the streamed text."""
    spec = TEMPLATES[template]
    turn_end = spec.turn_end if spec.turn_end is not None else tok.eos_token
    script = tok.encode(
        f"The forecast is rainy.{turn_end}{spec.user_next}invent more", add_special_tokens=False
    )
    eng = engine(tok, reg, [script + [tok.eos_token_id]], stop_strings=spec.stop_strings)
    deltas: list[str] = []
    stream = TextStream(tok, eng.visible_ids, lambda r, d: deltas.append(d), stop_strings=eng.stop_strings)
    [res] = eng.generate([enc(tok, "USER: weather? ASSISTANT:")], on_tokens=stream)
    assert res.text.strip() == "The forecast is rainy."
    assert "".join(deltas).strip() == "The forecast is rainy."
    assert res.finish_reason == ("stop_string" if spec.stop_strings else "eos")
    assert "invent" not in res.raw_text  # generation really stopped there


def test_stop_string_in_a_tool_result_does_not_end_the_row(tok, reg):
    """Only the model's own text can end a row: a forced tool result holding ``###`` does not."""
    script = enc(tok, '<tool_call>{"name": "shout", "arguments": {"text": "a ### b"}}</tool_call> after') + [
        tok.eos_token_id
    ]
    eng = engine(tok, reg, [script], stop_strings=("###",))
    [res] = eng.generate([enc(tok, "USER: a ASSISTANT:")])
    assert res.tool_results[0].result == "A ### B"
    assert res.finish_reason == "eos" and res.text.strip() == "after"


def test_react_observation_cannot_be_a_stop_string(tok, reg):
    with pytest.raises(ValueError, match="Observation"):
        engine(tok, reg, [[tok.eos_token_id]], tool_format="react", stop_strings=("Observation:",))
