"""The renderer: supervised spans decode to exactly the assistant text; everything else is masked."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from toollmm.core.batch import IGNORE_INDEX
from toollmm.core.tokens import TokenContract
from toollmm.core.toolcall import tool_call_entry
from toollmm.data.records import RecordError, validate_record
from toollmm.data.render import Renderer, media_tokens_from_config

SYSTEM = "You are helpful."


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    TokenContract().add_to(t)
    return t


def spans(sample, tok) -> list[str]:
    """Each maximal run of supervised tokens, decoded."""
    runs, cur = [], []
    for i, lab in zip(sample.input_ids, sample.labels):
        if lab != IGNORE_INDEX:
            assert lab == i  # labels are the ids themselves (unshifted)
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, clean_up_tokenization_spaces=False) for r in runs]


def masked_text(sample, tok) -> str:
    ids = [i for i, lab in zip(sample.input_ids, sample.labels) if lab == IGNORE_INDEX]
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def chat_record():
    return {
        "id": "chat-1",
        "source": "test",
        "images": ["img/a.png"],
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "<image>\nWhat is in the picture?"},
            {"role": "assistant", "content": "a red circle"},
            {"role": "user", "content": "and its size?"},
            {"role": "assistant", "content": "it is big"},
        ],
    }


def tool_record():
    return {
        "id": "tool-1",
        "source": "test",
        "messages": [
            {"role": "user", "content": "how many circles in shapes/17.png?"},
            {
                "role": "assistant",
                "content": "Let me count.",
                "tool_calls": [
                    tool_call_entry("count_objects", {"kind": "circle", "image": "shapes/17.png"})
                ],
            },
            {"role": "tool", "name": "count_objects", "content": "3 circles"},
            {"role": "assistant", "content": "There are 3."},
        ],
    }


def generate_record():
    return {
        "id": "gen-1",
        "source": "test",
        "audios": ["a.wav"],
        "messages": [
            {"role": "user", "content": "<audio> draw it and make a video"},
            {
                "role": "assistant",
                "content": "Here.",
                "generate": [{"modality": "image", "caption": "a dog", "embedding": "sd/1"}],
                "train": False,
            },
            {"role": "user", "content": "now a video and a sound"},
            {
                "role": "assistant",
                "content": "Done.",
                "generate": [
                    {"modality": "video", "caption": "a dog runs"},
                    {"modality": "audio", "embedding": "al/9"},
                ],
            },
        ],
    }


def test_image_chat_v1_supervises_exactly_the_answers(tok):
    r = Renderer(tok, "vicuna_v1", media_tokens={"image": 5})
    rec = chat_record()
    s = r.render(rec)
    assert spans(s, tok) == ["a red circle</s>", "it is big</s>"]
    masked = masked_text(s, tok)
    for text in (SYSTEM, "USER:", "What is in the picture?", "and its size?", "ASSISTANT:"):
        assert text in masked
    ph = r.token_ids.placeholder["image"]
    assert s.input_ids.count(ph) == 5 and s.input_ids[0] == tok.bos_token_id
    at = s.input_ids.index(ph)
    assert s.input_ids[at : at + 5] == [ph] * 5 and all(x == IGNORE_INDEX for x in s.labels[at : at + 5])
    assert s.media == [("image", "img/a.png")] and s.signals == [] and s.id == "chat-1"


def test_vicuna_v0_layout_and_supervision(tok):
    s = Renderer(tok, "vicuna_v0").render(chat_record())
    assert spans(s, tok) == ["a red circle\n###", "it is big\n###"]
    masked = masked_text(s, tok)
    assert "### Human:" in masked and "### Assistant:" in masked and "USER" not in masked
    assert "Human: and its size?" in masked


def test_tool_call_and_result_token_format(tok):
    r = Renderer(tok)
    s = r.render(tool_record())
    assert spans(s, tok) == [
        'Let me count.<tool_call>{"name":"count_objects","arguments":{"image":"shapes/17.png","kind":"circle"}}'
        "</tool_call>",
        "There are 3.</s>",  # decode drops the leading "▁" of a span; the space is supervised
    ]
    ids = r.token_ids.tool
    a, b = s.input_ids.index(ids["<tool_result>"]), s.input_ids.index(ids["</tool_result>"])
    assert all(x == IGNORE_INDEX for x in s.labels[a : b + 1])
    assert tok.decode(s.input_ids[a + 1 : b]) == "3 circles"
    # the agent's forced result is exactly what training saw
    assert s.input_ids[a : b + 1] == r.tool_result_ids("3 circles")


def test_signal_spans_supervised_with_caption_and_embedding(tok):
    contract = TokenContract()
    r = Renderer(tok, contract=contract)
    s = r.render(generate_record())
    assert spans(s, tok) == ["Done." + contract.signal_text("video") + contract.signal_text("audio") + "</s>"]
    img, vid, aud = s.signals
    assert (img.modality, img.caption, img.embedding, img.train) == ("image", "a dog", "sd/1", False)
    assert (vid.modality, vid.caption, vid.embedding, vid.train) == ("video", "a dog runs", None, True)
    assert (aud.modality, aud.caption, aud.embedding) == ("audio", None, "al/9")
    for span in s.signals:
        want = r.token_ids.signal[span.modality]
        assert s.input_ids[span.start : span.start + len(want)] == want
    assert s.labels[img.start] == IGNORE_INDEX and s.labels[vid.start] == s.input_ids[vid.start]
    assert s.media == [("audio", "a.wav")]


def test_video_as_frame_list_is_one_slot(tok):
    rec = {
        "id": "lavia-1",
        "source": "lavia",
        "videos": [["f/0.jpg", "f/1.jpg", "f/2.jpg"], "clip.mp4"],
        "messages": [
            {"role": "user", "content": "<video> then <video>: what changed?"},
            {"role": "assistant", "content": "the ball moved"},
        ],
    }
    s = Renderer(tok, media_tokens={"video": 2}).render(rec)
    assert s.media == [("video", ["f/0.jpg", "f/1.jpg", "f/2.jpg"]), ("video", "clip.mp4")]
    assert s.input_ids.count(Renderer(tok).token_ids.placeholder["video"]) == 4


# GPT4Tools validation output (tyshiwo1/GPT4Tools test_res, record 2 of ../shared/samples): the converter keeps
# "\n" before each observation and the "\n\n" after the answer in meta.react.
GPT4TOOLS_OUTPUT = (
    "Thought: Do I need to use a tool? Yes\nAction: Edge Detection On Image\nAction Input: images/berdtnln.png\n"
    "Observation:\nimage/ayffkvlr.png\nThought: Do I need to use a tool? Yes\n"
    "Action: Generate Image Condition On Canny Image\n"
    "Action Input: image/ayffkvlr.png, busy city street with lots of cars at dusk\n"
    "Observation:\nResult saved as examples/wfydymnx.png\n"
    "Thought: Do I need to use a tool? No\nAI: Result saved as examples/wfydymnx.png\n\n"
)


def react_record():
    def call(name, raw):
        return {"role": "assistant", "content": "", "tool_calls": [tool_call_entry(name, {"input": raw})]}

    return {
        "id": "gpt4tools-val-2",
        "source": "gpt4tools",
        "tools": [{"type": "function", "function": {"name": "Edge Detection On Image"}}],
        "meta": {"react": {"observation_sep": "\n", "end": "\n\n"}},
        "messages": [
            {"role": "user", "content": "Generate a real image of a busy city street from the edge image"},
            call("Edge Detection On Image", "images/berdtnln.png"),
            {"role": "tool", "content": "image/ayffkvlr.png"},
            call(
                "Generate Image Condition On Canny Image",
                "image/ayffkvlr.png, busy city street with lots of cars at dusk",
            ),
            {"role": "tool", "content": "Result saved as examples/wfydymnx.png"},
            {"role": "assistant", "content": "Result saved as examples/wfydymnx.png"},
        ],
    }


def test_react_format_reproduces_the_source_text_and_masks_observations(tok):
    rec = react_record()
    assert validate_record(rec) == []
    s = Renderer(tok, tool_format="react").render(rec)
    full = tok.decode(s.input_ids, clean_up_tokenization_spaces=False)
    assert full.endswith(" ASSISTANT: " + GPT4TOOLS_OUTPUT + "</s>")
    assert spans(s, tok) == [
        "Thought: Do I need to use a tool? Yes\nAction: Edge Detection On Image\nAction Input: images/berdtnln.png"
        "\nObservation:",
        "Thought: Do I need to use a tool? Yes\nAction: Generate Image Condition On Canny Image\n"
        "Action Input: image/ayffkvlr.png, busy city street with lots of cars at dusk\nObservation:",
        "Thought: Do I need to use a tool? No\nAI: Result saved as examples/wfydymnx.png\n\n</s>",
    ]
    assert "image/ayffkvlr.png\n" in masked_text(s, tok)
    # the same record in token format
    assert spans(Renderer(tok).render(rec, where="x"), tok)[0].startswith(
        '<tool_call>{"name":"Edge Detection'
    )


def test_react_helpers_agree_with_the_converters_module():
    react = pytest.importorskip("toollmm.core.react")
    from toollmm.data import templates as t

    assert t.react_call_text("A", "x, y", None) == react.format_react_call("A", "x, y", None)
    assert t.react_call_text("A", "x", "Custom.") == react.format_react_call("A", "x", "Custom.")
    assert t.react_observation_text("o", "\n") == react.format_react_observation("o", "\n")
    assert t.react_final_text("ans", None, "Final Answer: ", " \n") == react.format_react_final(
        "ans", None, "Final Answer: ", " \n"
    )
    for args in ({"input": "raw"}, {"b": 1, "a": "é"}, {}):
        assert t.react_call_input(args) == react.call_input(args)
    rec = react_record()
    style = react.ReactStyle.from_meta(rec["meta"])
    assert react.format_messages(rec["messages"][1:], style) == GPT4TOOLS_OUTPUT


def test_react_refuses_two_calls_in_one_message(tok):
    rec = tool_record()
    rec["messages"][1]["content"] = ""
    rec["messages"][1]["tool_calls"].append(tool_call_entry("other"))
    rec["messages"].insert(3, {"role": "tool", "content": "x"})
    with pytest.raises(RecordError, match=r"src: record 'tool-1': ReAct text holds exactly one tool call"):
        Renderer(tok, tool_format="react").render(rec, where="src")


def test_context_turns_are_masked(tok):
    rec = chat_record()
    rec["messages"][2]["train"] = False
    s = Renderer(tok).render(rec)
    assert spans(s, tok) == ["it is big</s>"]
    assert "a red circle</s>" in masked_text(s, tok)


def test_overlong_raise_skip_and_truncate(tok):
    rec = chat_record()
    full = len(Renderer(tok, media_tokens={"image": 40}).render(rec))
    with pytest.raises(RecordError, match=rf"src: record 'chat-1': {full} tokens .* > max_length {full - 1}"):
        Renderer(tok, media_tokens={"image": 40}, max_length=full - 1).render(rec, where="src")
    skip = Renderer(tok, media_tokens={"image": 40}, max_length=full - 1, overlong="skip")
    assert skip.render(rec) is None and skip.skipped["overlong"] == 1 and skip.rendered == 0
    ph = skip.token_ids.placeholder["image"]
    seen = set()
    for limit in range(20, full):
        r = Renderer(tok, media_tokens={"image": 40}, max_length=limit, overlong="truncate")
        s = r.render(rec)
        if s is None:  # not even the first turn fits: skipped and counted, never cut inside it
            assert r.skipped["overlong"] == 1
            seen.add(0)
            continue
        assert len(s) <= limit and s.truncated and r.truncated == 1
        assert s.input_ids.count(ph) == 40 * len(s.media)  # media spans whole
        assert s.input_ids[-1] == tok.eos_token_id and s.labels[-1] == tok.eos_token_id
        seen.add(len(spans(s, tok)))
    assert seen == {0, 1}


def test_truncate_keeps_media_and_signals_of_kept_turns_only(tok):
    rec = generate_record()
    rec["messages"][1]["train"] = True
    rec["messages"][2]["content"] = "<image> now a video and a sound"
    rec["images"] = ["b.png"]
    n_first = len(Renderer(tok).render({**rec, "messages": rec["messages"][:2], "images": []}))
    s = Renderer(tok, max_length=n_first + 2, overlong="truncate").render(rec)
    assert s.media == [("audio", "a.wav")] and [x.modality for x in s.signals] == ["image"]


def test_generation_prompt_matches_training_prefix(tok):
    r = Renderer(tok)
    rec = chat_record()
    prompt = r.render_for_generation(rec["messages"][:2], images=rec["images"])
    train = r.render(rec)
    assert prompt.input_ids == train.input_ids[: len(prompt)]
    assert tok.decode(prompt.input_ids[-10:]).endswith("? ASSISTANT:")
    assert all(x == IGNORE_INDEX for x in prompt.labels) and prompt.media == [("image", "img/a.png")]
    # after a tool result the assistant turn continues: no new header
    tr = tool_record()
    cont = r.render_for_generation(tr["messages"][:3])
    assert cont.input_ids[-1] == r.token_ids.tool["</tool_result>"]
    with pytest.raises(RecordError, match="already ends with an assistant turn"):
        r.render_for_generation(tr["messages"])
    with pytest.raises(RecordError, match=r"1 <image> placeholder"):
        r.render_for_generation(rec["messages"][:2])


def test_bad_records_are_named_not_rendered_wrong(tok):
    r = Renderer(tok)
    rec = chat_record()
    rec["messages"][3]["content"] = "what about </s> this"
    with pytest.raises(RecordError, match=r"record 'chat-1': record text contains the special token '</s>'"):
        r.render(rec)
    rec = chat_record()
    rec["images"] = []
    with pytest.raises(RecordError, match=r"record 'chat-1': <image> #1 has no `images` entry"):
        r.render(rec)
    rec = chat_record()
    for m in rec["messages"]:
        if m["role"] == "assistant":
            m["train"] = False
    with pytest.raises(RecordError, match="nothing to supervise"):
        r.render(rec)
    with pytest.raises(ValueError, match="overlong"):
        Renderer(tok, overlong="cut")
    with pytest.raises(ValueError, match="unknown chat template"):
        Renderer(tok, "llama3")


def test_from_config_and_media_tokens(tok):
    from toollmm.core.config import load_config

    cfg = load_config(overrides=["model.chat_template=vicuna_v0", "data.max_length=64"]).config
    r = Renderer.from_config(cfg, tok)
    assert r.fmt.template.name == "vicuna_v0" and r.max_length == 64 and r.stop_strings == ("###",)
    assert media_tokens_from_config(cfg.model) == {"image": 1, "video": 1, "audio": 1}
    cfg.model.encoder.output = "tokens"
    cfg.model.input_proj.tokens_per_input = 2
    assert media_tokens_from_config(cfg.model) == {"image": 2, "audio": 6, "video": 10}
    small = copy.deepcopy(chat_record())
    with pytest.raises(RecordError, match="max_length 64"):
        r.render(small)


def test_readme_renderings_are_what_the_renderer_supervises(tok):
    """data/README.md shows supervised text as [[...]]: it must be exactly what the renderer supervises."""
    import json
    import re

    from toollmm.core.paths import DATA_DIR

    section = (DATA_DIR / "README.md").read_text().split("## Worked examples", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    checked = 0
    for i, (lang, body) in enumerate(blocks):
        if lang != "json":
            continue
        rec = json.loads(body)
        shown = []
        for lang2, body2 in blocks[i + 1 :]:
            if lang2 == "json":
                break
            if not lang2:
                shown.append(body2)
        for text in shown:
            fmt = "react" if "Thought:" in text else "tokens"
            want = [s.replace("\\n", "\n").removeprefix(" ") for s in re.findall(r"\[\[(.*?)\]\]", text)]
            assert spans(Renderer(tok, tool_format=fmt).render(rec), tok) == want, rec["id"]
            checked += 1
    assert checked == 4


def test_a_token_across_a_label_boundary_is_an_error_not_a_shifted_label(tmp_path):
    """A vocabulary with a ':\\n' piece merges GPT4Tools' "Observation:" (supervised) with the "\\n" before the
    observation (masked). Llama's vocabulary never merges a newline; this one does, and the renderer says so."""
    from toollmm.model.tiny_tokenizer import build_sentencepiece_tokenizer

    texts = ["Observation:\nimage/a.png\nThought: ok"] * 50 + ["the quick brown fox"] * 10
    tok = AutoTokenizer.from_pretrained(
        build_sentencepiece_tokenizer(texts, tmp_path, vocab_size=340, split_newlines=False)
    )
    TokenContract().add_to(tok)
    assert ":\n" in tok.convert_ids_to_tokens(tok.encode("Observation:\nx", add_special_tokens=False))
    with pytest.raises(
        RecordError, match=r"record 'gpt4tools-val-2': token ':\\n' spans ':\\n' across a supervised"
    ):
        Renderer(tok, tool_format="react").render(react_record())
    assert Renderer(tok).render(react_record()).num_supervised > 0  # the token format has no such boundary
