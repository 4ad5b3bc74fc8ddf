"""A chat session's history is what the model saw: after every turn N, the ids the model was given and
produced (turn N's prompt + every generated or forced token, tool results included) equal the training
renderer's ids for the same conversation written as a record, and turn N+1's prompt starts with them.
So a later turn reads its history exactly as training rendered such conversations (issue: chat broke
after one turn). Driven through the real runtime (``toollmm.load`` -> ``ChatSession`` -> decode engine ->
``ToolLMMStepModel``); only the next-token choice is scripted, so the tiny model writes tool calls,
answers and signal spans, in the form training renders them (canonical call JSON, a signal span right
after the answer text); the session canonicalises other forms when it writes the history back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import toollmm
from inference_fixtures import IMAGE_SPAN, steer
from toollmm.core.toolcall import canonical_json
from toollmm.infer.requests import Request

CALL = canonical_json({"name": "calculator", "arguments": {"a": 120, "b": 35, "op": "add"}})
TURNS = [
    ("What is 120 plus 35?", False),
    ("Caption this image.", True),
    ("Draw a blue triangle.", False),
]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "blue.png"
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[6:26, 6:26] = (30, 30, 220)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def rt(tiny_stage_dir, tmp_path_factory):
    runtime = toollmm.load(tiny_stage_dir, output_dir=tmp_path_factory.mktemp("chat_ids"))
    return steer(
        runtime,
        [
            # a trained model writes calls the way training rendered them: canonical JSON
            ("plus", f"<tool_call>{CALL}</tool_call> The answer is 155."),
            ("Caption", "A blue square."),
            ("Draw", "Here it is." + IMAGE_SPAN),  # training renders the span right after the text
        ],
    )


def _record(session) -> dict:
    return {"id": "chat", "messages": session.messages, **session.media}


def test_each_turns_ids_equal_the_renderers_ids_for_the_conversation(rt, image_file):
    rt.new_chat()
    session = rt.conversation
    seen: list[tuple[list[int], list[int]]] = []  # (prompt ids, generated + forced ids) per turn
    inner_generate = rt.engine.generate

    def recording_generate(prompts, media, **kw):
        rows = inner_generate(prompts, media, **kw)
        seen.append((list(prompts[0]), list(rows[0].token_ids)))
        return rows

    rt.engine.generate = recording_generate
    try:
        outs = [session.send(text, [("image", str(image_file))] if img else []) for text, img in TURNS]
    finally:
        del rt.engine.generate
    assert [o["errors"] for o in outs] == [[], [], []]
    assert outs[0]["tool_calls"][0]["result"] == '{"result": 155}'
    assert len(outs[2]["media"]) == 1  # the signal span was decoded into a file

    for n in range(len(TURNS)):
        prompt, produced = seen[n]
        # the turn ended on EOS (the engine stops there and keeps it out of the row's ids)
        eos = rt.tokenizer.eos_token_id
        model_saw = prompt + produced + ([] if produced[-1:] == [eos] else [eos])
        # the conversation up to and including turn n's assistant messages, as a training record
        upto = [i for i, m in enumerate(session.messages) if m["role"] == "user"]
        end = upto[n + 1] if n + 1 < len(upto) else len(session.messages)
        record = {**_record(session), "messages": session.messages[:end]}
        record["images"] = session.media["images"][: sum(1 for _, img in TURNS[: n + 1] if img)]
        rendered = rt.renderer.render(record, where="chat")
        assert rendered is not None
        assert list(rendered.input_ids) == model_saw, f"turn {n + 1}: history differs from what the model saw"
        if n + 1 < len(TURNS):  # the next prompt continues exactly from it
            assert seen[n + 1][0][: len(model_saw)] == model_saw


def test_chat_prompt_equals_a_request_with_the_same_history(rt, image_file):
    """The session's prompt for turn 2 is the prompt of a plain request carrying the same messages."""
    rt.new_chat()
    session = rt.conversation
    session.send(*TURNS[0][:1])
    messages = [*session.messages, {"role": "user", "content": "<image>\nCaption this image."}]
    req = Request(messages=messages, images=[str(image_file)])
    prompts = []
    inner_generate = rt.engine.generate

    def recording_generate(p, media, **kw):
        prompts.append(list(p[0]))
        return inner_generate(p, media, **kw)

    rt.engine.generate = recording_generate
    try:
        session.send("Caption this image.", [("image", str(image_file))])
    finally:
        del rt.engine.generate
    assert prompts[0] == rt.prompt(req)


def _session_prompts(rt, image_file) -> list[list[int]]:
    """Each turn's prompt ids of a ``ChatSession`` (inference.py --chat, the app) over ``TURNS``."""
    rt.new_chat()
    prompts: list[list[int]] = []
    inner_generate = rt.engine.generate

    def recording_generate(p, media, **kw):
        prompts.append(list(p[0]))
        return inner_generate(p, media, **kw)

    rt.engine.generate = recording_generate
    try:
        for text, img in TURNS:
            rt.conversation.send(text, [("image", str(image_file))] if img else [])
    finally:
        del rt.engine.generate
    return prompts


def test_a_served_chat_renders_each_turn_as_the_chat_session_does(rt, image_file):
    """``serve.py --run-tools``: a client appends each reply as it got it (the ``tool_results`` extension,
    generated media as content parts) and sends the image as a content part; each turn's prompt ids then
    equal the chat session's for the same turns (so also the training renderer's for the record)."""
    import json

    from fastapi.testclient import TestClient

    from toollmm.serve.app import Server, build_app

    expected = _session_prompts(rt, image_file)
    server = Server(rt, model_name="tiny", run_tools=True, media_root=image_file.parent, batch_wait_ms=0)
    history: list[dict] = []
    try:
        with TestClient(build_app(server)) as tc:
            for n, (text, img) in enumerate(TURNS):
                content = text
                if img:
                    part = {"type": "image_url", "image_url": {"url": str(image_file)}}
                    content = [part, {"type": "text", "text": text}]
                history.append({"role": "user", "content": content})
                body = {"model": "tiny", "messages": history}
                _, prompt, _, _ = server.prepare(json.dumps(body).encode())
                assert prompt == expected[n], (
                    f"turn {n + 1}: the served prompt differs from the chat session's"
                )
                reply = tc.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
                history.append(reply)
    finally:
        server.batcher.close()
    assert history[1]["tool_results"][0]["name"] == "calculator"


def test_batched_turns_grow_each_history_as_send_does(rt, image_file):
    """``send_turns`` (the held-out multi-turn evaluation plays many chats per generate call) leaves each
    session with the messages and media a one-by-one ``send`` leaves."""
    from toollmm.infer.session import send_turns

    one = rt.session()
    for text, img in TURNS:
        one.send(text, [("image", str(image_file))] if img else [])
    many = [rt.session(), rt.session()]
    for text, img in TURNS:
        media = [("image", str(image_file))] if img else []
        outs, rows = send_turns(many, [(text, media), (text, media)])
        assert all(r is not None for r in rows) and [o["errors"] for o in outs] == [[], []]
    for s in many:
        assert s.media == one.media
        strip = [{k: v for k, v in m.items() if k != "generate"} for m in one.messages]
        assert [{k: v for k, v in m.items() if k != "generate"} for m in s.messages] == strip
        gens = [[g["modality"] for g in m.get("generate", [])] for m in s.messages]
        assert gens == [[g["modality"] for g in m.get("generate", [])] for m in one.messages]
