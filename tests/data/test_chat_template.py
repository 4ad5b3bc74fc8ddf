"""The shipped Jinja chat template renders the Python renderer's ids (after placeholder expansion)."""

from __future__ import annotations

import random

import pytest
from jinja2.exceptions import TemplateError
from test_data_schema import readme_examples
from test_render import chat_record, generate_record, react_record, tool_record
from transformers import AutoTokenizer

from toollmm.core.batch import IGNORE_INDEX
from toollmm.core.tokens import MODALITIES, PLACEHOLDER, TokenContract, TokenContractError
from toollmm.core.toolcall import tool_call_entry
from toollmm.data.chat_template import chat_template_info, chat_template_source, install_chat_template
from toollmm.data.records import RecordError, validate_record
from toollmm.data.render import Renderer
from toollmm.data.templates import ChatFormat

MEDIA = {"image": 3, "video": 2, "audio": 1}
COMBOS = [("vicuna_v1", "tokens"), ("vicuna_v0", "tokens"), ("vicuna_v1", "react"), ("vicuna_v0", "react")]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    TokenContract().add_to(t)
    return t


def expand(ids: list[int], renderer: Renderer) -> list[int]:
    """What the renderer does to the template's ids: placeholder i of modality m -> media_tokens[m] copies."""
    out = []
    for i in ids:
        m = renderer._placeholder.get(i)
        out.extend([i] * renderer.media_tokens[m] if m else [i])
    return out


def template_ids(tok, record, source, **kw) -> list[int]:
    return tok.apply_chat_template(
        record["messages"],
        tools=record.get("tools"),
        meta=record.get("meta"),
        chat_template=source,
        return_dict=False,
        **kw,
    )


def hand_records() -> list[dict]:
    return readme_examples() + [chat_record(), tool_record(), generate_record(), react_record()]


def _words(rng: random.Random, n: int) -> str:
    pool = ["the", "red", "circle", "Thought:", "AI:", "###", "USER:", " ", "  ", "\n", "\n\n", ":", "é", "😀",
            "0.5", '"q"', "{", "}", "\\", "tab\t", "Observation:", "a/b.png", ",", "Human"]  # fmt: skip
    return "".join(rng.choice(pool) + rng.choice(["", " "]) for _ in range(n))


def random_record(rng: random.Random, k: int) -> dict:
    """A valid record with random text, media, generate targets, context turns and tool episodes."""
    media = {m: [] for m in MODALITIES}
    msgs = [{"role": "system", "content": _words(rng, 4)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        text = _words(rng, rng.randint(0, 6))
        for m in rng.sample(MODALITIES, rng.randint(0, 2)):
            text = PLACEHOLDER[m] + rng.choice(["\n", " ", ""]) + text
            media[m].append(f"{m}/{k}.x")
        msgs.append({"role": "user", "content": text})
        for _ in range(rng.randint(0, 2)):  # tool episode: one call per step (ReAct-compatible)
            args = (
                {"input": _words(rng, 2)}
                if rng.random() < 0.5
                else {"b": rng.randint(0, 9), "a": _words(rng, 1)}
            )
            msgs.append({"role": "assistant", "content": "", "tool_calls": [tool_call_entry("tool_x", args)]})
            msgs.append({"role": "tool", "name": "tool_x", "content": _words(rng, rng.randint(0, 3))})
        a = {"role": "assistant", "content": _words(rng, rng.randint(0, 6))}
        if rng.random() < 0.3:
            a["generate"] = [{"modality": rng.choice(MODALITIES), "caption": "c"}]
        if rng.random() < 0.2:
            a["train"] = False
        msgs.append(a)
    rec = {"id": f"rand-{k}", "source": "random", "messages": msgs, "eval": {}}
    rec.update({f"{m}s": v for m, v in media.items() if v})
    assert validate_record(rec) == [], validate_record(rec)
    return rec


@pytest.mark.parametrize("template,tool_format", COMBOS)
def test_template_text_and_ids_equal_the_renderer(tok, template, tool_format):
    r = Renderer(tok, template, tool_format=tool_format, media_tokens=MEDIA)
    src = chat_template_source(r.fmt)
    rng = random.Random(hash((template, tool_format)) % 1000)
    records = hand_records() + [random_record(rng, k) for k in range(60)]
    n_supervised = 0
    for rec in records:
        if not any(m.get("train", True) for m in rec["messages"] if m["role"] == "assistant"):
            continue
        try:
            s = r.render(rec)
        except RecordError as e:  # both sides refuse what the format cannot express
            assert e.reason == "format" and tool_format == "react", e
            with pytest.raises(TemplateError, match="ReAct text holds exactly one tool call"):
                template_ids(tok, rec, src)
            continue
        assert expand(template_ids(tok, rec, src), r) == s.input_ids, rec["id"]
        n_supervised += 1
    assert n_supervised > 40


@pytest.mark.parametrize("template,tool_format", COMBOS[:3])
def test_generation_blocks_mark_exactly_the_supervised_tokens(tok, template, tool_format):
    r = Renderer(tok, template, tool_format=tool_format)  # one token per placeholder: positions line up
    src = chat_template_source(r.fmt)
    rng = random.Random(7)
    for rec in hand_records() + [random_record(rng, k) for k in range(30)]:
        if not any(m.get("train", True) for m in rec["messages"] if m["role"] == "assistant"):
            continue
        if tool_format == "react" and rec["id"] == "tool-1":
            continue  # content next to a call: no ReAct form (tested above)
        s = r.render(rec)
        out = tok.apply_chat_template(
            rec["messages"],
            tools=rec.get("tools"),
            meta=rec.get("meta"),
            chat_template=src,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert out["input_ids"] == s.input_ids
        assert out["assistant_masks"] == [int(x != IGNORE_INDEX) for x in s.labels], rec["id"]


def test_generation_prompt_equals_render_for_generation(tok):
    for template in ("vicuna_v1", "vicuna_v0"):
        r = Renderer(tok, template, media_tokens=MEDIA)
        src = chat_template_source(r.fmt)
        rec = chat_record()
        msgs = rec["messages"][:4]
        prompt = r.render_for_generation(msgs, images=rec["images"])
        ids = template_ids(tok, {"messages": msgs}, src, add_generation_prompt=True)
        assert expand(ids, r) == prompt.input_ids
        tr = tool_record()  # ends with a tool result: the turn continues, no header either way
        ids = template_ids(tok, {"messages": tr["messages"][:3]}, src, add_generation_prompt=True)
        assert ids == r.render_for_generation(tr["messages"][:3]).input_ids


def test_installed_template_survives_save_and_load(tok, tmp_path):
    contract = TokenContract()
    install_chat_template(tok, "vicuna_v0", contract, tool_format="react", system_prompt="")
    assert chat_template_info(tok) == {"template": "vicuna_v0", "tool_format": "react"}
    tok.save_pretrained(tmp_path / "t")
    back = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert chat_template_info(back) == {"template": "vicuna_v0", "tool_format": "react"}
    r = Renderer(back, "vicuna_v0", tool_format="react", system_prompt="")
    rec = react_record()
    assert template_ids(back, rec, None) == r.render(rec).input_ids
    # the installed default tool format can be overridden per call, like the renderer's setting
    plain = Renderer(back, "vicuna_v0", system_prompt="")
    assert template_ids(back, rec, None, tool_format="tokens") == plain.render(rec).input_ids
    with pytest.raises(TokenContractError, match=r"\[IMG4\] is not in the tokenizer"):
        install_chat_template(back, "vicuna_v1", TokenContract({"image": 9, "video": 1, "audio": 1}))
    assert chat_template_info(AutoTokenizer.from_pretrained(tmp_path / "t", chat_template="{{ x }}")) is None


def test_awkward_system_prompts_are_escaped(tok):
    for system in ['say "hi" \\ {{ x }} {% if %} #} é😀', "line1\nline2\r\n", ""]:
        fmt = ChatFormat.build("vicuna_v1", TokenContract(), tok, system_prompt=system)
        r = Renderer(tok, system_prompt=system)
        rec = tool_record()
        assert template_ids(tok, rec, chat_template_source(fmt)) == r.render(rec).input_ids, repr(system)
