"""``toollmm.load(stage)`` end to end on a tiny stage folder: signal spans decoded into files through one
lazily built decoder pool (with the precomputed empty-prompt negative embeddings and the model's real
hidden states), tools executed in-stream (demo set, built-in generation, captioning through the model),
multi-turn chat with media in later turns, streaming, and the benchmarks' generator."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import toollmm
from inference_fixtures import IMAGE_SPAN, call_text, steer
from toollmm.core.batch import Batch
from toollmm.core.tokens import signal_token
from toollmm.demo.tools import run_demo_tool
from toollmm.infer.requests import Request, prompt_request
from toollmm.infer.step import project_signal


def span(rt, modality: str) -> str:
    return "".join(signal_token(modality, k) for k in range(len(rt.model.bundle.token_ids.signal[modality])))


@pytest.fixture(scope="module")
def rt(tiny_stage_dir, tmp_path_factory):
    runtime = toollmm.load(tiny_stage_dir, output_dir=tmp_path_factory.mktemp("inference_out"))
    return steer(
        runtime,
        [
            ("draw", "Here it is. " + IMAGE_SPAN),
            ("film", "A clip: " + span(runtime, "video")),
            ("sing", span(runtime, "audio") + " Listen."),
            ("plus", call_text("calculator", '{"a": 2, "b": 3, "op": "add"}') + " The answer is 5."),
            ("picture tool", call_text("generate_image", '{"prompt": "a red circle"}') + " Done."),
            ("broken", '<tool_call>{"name": "calculator", "arguments": {"a": 1,</tool_call> Sorry.'),
            ("ask me", "Sure, "),
        ],
    )


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "red.png"
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[8:32, 8:32] = (220, 30, 30)
    Image.fromarray(img).save(path)
    return path


def test_signal_spans_are_decoded_by_one_pool_with_real_hidden_states(rt):
    calls = []
    generate = rt.decoders.generate

    def spy(modality, prompt_embeds, negative_prompt_embeds=None, **kw):  # records, then really decodes
        calls.append((modality, prompt_embeds.detach().clone(), negative_prompt_embeds))
        return generate(modality, prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **kw)

    rt.decoders.generate = spy
    try:
        req = prompt_request("please draw a square")
        [row] = rt.generate([req])
        second = rt.run([prompt_request("draw it again")])[0]
    finally:
        del rt.decoders.generate
    assert rt.decoders.constructions["image"] == 1  # two requests, one pipeline construction
    [ev] = row.signals
    assert ev.error is None and not ev.forced and row.errors == []
    first = ev.result
    assert first["modality"] == "image" and second["media"][0]["path"] != first["path"]
    assert [first["seed"], second["media"][0]["seed"]] == [0, 1]
    for m in (first, second["media"][0]):
        with Image.open(m["path"]) as im:
            assert im.format == "PNG" and im.size[0] > 0
    # what reached the decoder: the output projection of the span's hidden states from ONE full forward
    ids = torch.tensor([rt.prompt(req) + row.token_ids])
    with torch.no_grad():
        emb = rt.model.embed(Batch(ids, torch.full_like(ids, -100), torch.ones_like(ids)))
        hidden = rt.model.llm(inputs_embeds=emb, output_hidden_states=True).hidden_states[-1][0, ev.positions]
        expected = project_signal(rt.model, "image", hidden)
    assert torch.allclose(calls[0][1], expected, atol=1e-4)
    # guidance used the precomputed empty-prompt embedding (the same tensor every time)
    negative = calls[0][2]
    assert negative is rt.decoders.negative_embeds("image") and calls[1][2] is negative
    assert torch.allclose(negative, rt.decoders.encode_captions("image", [""])[0])


def test_video_and_audio_spans_write_mp4_and_wav(rt):
    video, audio = rt.run([prompt_request("film a ball"), prompt_request("sing a tone")])
    [v], [a] = video["media"], audio["media"]
    assert v["modality"] == "video" and v["path"].endswith(".mp4")
    with av.open(v["path"]) as container:
        assert sum(1 for _ in container.decode(video=0)) == rt.cfg.model.decoders["video"].num_frames
    data, rate = sf.read(a["path"])
    assert a["path"].endswith(".wav") and data.size > 0 and rate > 0
    assert video["text"].strip() == "A clip:" and audio["text"].strip() == "Listen."
    assert video["errors"] == audio["errors"] == []


def test_demo_tool_call_runs_and_the_answer_continues(rt):
    chunks = []
    [out] = rt.run([prompt_request("what is 2 plus 3")], on_text=lambda i, d: chunks.append((i, d)))
    [call] = out["tool_calls"]
    assert call["name"] == "calculator" and call["arguments"] == {"a": 2, "b": 3, "op": "add"}
    assert (
        json.loads(call["result"]) == run_demo_tool("calculator", call["arguments"]) and call["error"] is None
    )
    assert out["text"].strip() == "The answer is 5." and out["errors"] == []
    assert "".join(d for _, d in chunks) == out["text"] and {i for i, _ in chunks} == {0}  # streamed, no call
    t = out["timings"]
    assert set(t) == {"load_s", "first_token_s", "total_s"} and 0 < t["first_token_s"] <= t["total_s"]
    assert t["load_s"] == pytest.approx(rt.load_s, abs=1e-3) and rt.load_s > 0


def test_demo_generate_image_keeps_its_result_and_writes_the_file(rt):
    [out] = rt.run([prompt_request("use the picture tool")])
    [call] = out["tool_calls"]
    want = run_demo_tool("generate_image", {"prompt": "a red circle"})
    assert json.loads(call["result"]) == want  # exactly what the demo model was trained to read
    [m] = out["media"]
    assert m["path"] == str((rt.output_dir / want["image"]).resolve()) and m["modality"] == "image"
    assert Image.open(m["path"]).format == "PNG"


def test_malformed_call_is_reported_not_run(rt):
    [out] = rt.run([prompt_request("a broken request")])
    assert out["tool_calls"][0]["error"].startswith("malformed tool call")
    assert any("malformed" in e for e in out["errors"]) and out["text"].strip() == "Sorry."


def test_builtin_generation_tools_write_into_the_workspace(rt):
    res = rt.registry.call("generate_audio", {"prompt": "a low hum"})
    assert res.error is None and res.result.endswith(".wav")
    assert sf.read(rt.registry.workspace.root / res.result)[0].size > 0
    assert rt.registry.call("generate_audio", {"prompt": ""}).error.startswith("invalid arguments")


def test_bad_request_is_reported_and_the_others_still_run(rt, tmp_path):
    bad = prompt_request("draw", [("image", str(tmp_path / "missing.png"))])
    bad.id = "bad-1"
    out_bad, out_good = rt.run([bad, prompt_request("what is 2 plus 3")])
    assert out_bad["text"] == "" and "bad-1" in out_bad["errors"][0] and "missing.png" in out_bad["errors"][0]
    assert out_good["tool_calls"][0]["result"] == '{"result": 5}'


def test_chat_keeps_history_with_media_in_later_turns(rt, image_file):
    seen = []
    inner_start = rt.step_model.start

    def recording_start(prompts, media=None):
        seen.append((rt.tokenizer.decode(prompts[0]), media[0]))
        return inner_start(prompts, media)

    rt.step_model.start = recording_start
    try:
        rt.new_chat()
        one = rt.chat("what is 2 plus 3")
        two = rt.chat("ask me about this", images=[str(image_file)])
        three = rt.chat("and this one too?", images=[str(image_file)])
    finally:
        del rt.step_model.start
    assert one["tool_calls"][0]["result"] == '{"result": 5}' and two["errors"] == three["errors"] == []
    assert [len(m.get("image").pixels) if "image" in m else 0 for _, m in seen] == [0, 1, 2]
    # turn 2's prompt holds turn 1 (its call, the tool result and the answer) before the new image
    text2 = seen[1][0]
    assert (
        text2.index("what is 2 plus 3") < text2.index("The answer is 5.") < text2.index("ask me about this")
    )
    assert '"result": 5' in text2
    roles = [m["role"] for m in rt.conversation.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant", "user", "assistant"]
    assert rt.conversation.messages[4]["content"].startswith("<image>\n")
    assert rt.conversation.media["images"] == [str(image_file)] * 2
    rt.new_chat()
    assert rt.conversation.messages == []


def test_eval_generator_stops_at_the_first_call_without_running_it(rt):
    ran = []
    rt.registry.set_backend("count_letters", lambda word, letter: ran.append(word) or "{}")
    rt.step_model.rules.append(
        ("letters", call_text("count_letters", '{"word": "abba", "letter": "a"}') + " x")
    )
    gen = rt.eval_generator("gpt4tools")
    prompts = [
        {
            "id": "a",
            "step": 0,
            "messages": [{"role": "user", "content": "count letters"}],
            "stop_at_tool_call": True,
        },
        {
            "id": "b",
            "step": 0,
            "messages": [{"role": "user", "content": "count letters"}],
            "stop_at_tool_call": False,
        },
    ]
    stopped, free = gen(prompts)
    assert stopped["tool_calls"] == [
        {
            "name": "count_letters",
            "arguments": {"word": "abba", "letter": "a"},
            "result": None,
            "error": None,
            "duration_s": 0.0,
        }
    ]
    assert stopped["text"] == "" and free["text"].strip() == "x"
    assert ran == ["abba"]  # only the free-running prompt executed the tool


def test_captioning_and_qa_are_the_models_own_output(tiny_stage_dir, tmp_path, image_file):
    plain = toollmm.load(tiny_stage_dir, output_dir=tmp_path)  # not steered: the tiny model's own words
    (tmp_path / "in.png").write_bytes(image_file.read_bytes())
    caption = plain.registry.call("caption", {"path": "in.png"})
    answer = plain.registry.call("answer_question", {"path": "in.png", "question": "what colour is it"})
    assert caption.error is None and answer.error is None
    direct = plain.run(
        [
            prompt_request("Describe the image.", [("image", str(tmp_path / "in.png"))]),
            prompt_request("what colour is it", [("image", str(tmp_path / "in.png"))]),
        ]
    )
    assert caption.result == direct[0]["text"].strip() and answer.result == direct[1]["text"].strip()
    assert caption.result and caption.result != answer.result  # depends on the question: not a constant
    gpt4 = plain.registry.call("Get Photo Description", {"image_path": "in.png"})
    assert gpt4.result == caption.result
    with pytest.raises(ValueError, match="cannot tell"):
        plain.ask_about(tmp_path / "notes.txt")


def test_request_from_record_resolves_media(tmp_path):
    req = Request.from_record({"messages": [], "images": ["a.png"], "id": 7}, media_root=tmp_path)
    assert req.images == [str(tmp_path / "a.png")] and req.id == "7"
