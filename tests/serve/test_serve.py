"""``code/serve.py``: the OpenAI Chat Completions server, driven by the real ``openai`` client over HTTP.

One server per module (uvicorn in a thread, a free 127.0.0.1 port) over the tiny stage folder. Rows whose
prompt holds a key of ``RULES`` are steered (their next token scripted; forward, KV cache, hidden states and
decoders are the real model's); every other row decodes with the real model's own logits through the
batched step model, so the batching tests see real numerics.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import toollmm
from entry_points import load_script
from inference_fixtures import IMAGE_SPAN, Steered, call_text
from toollmm.agent.engine import RowOptions
from toollmm.agent.protocol import StepOutput
from toollmm.agent.scripted import ScriptedModel
from toollmm.core.paths import REPO_ROOT
from toollmm.infer.batched_step import BatchedStepModel
from toollmm.infer.step import ToolLMMStepModel
from toollmm.serve.app import Server, build_app

KEY = "sk-test-key"
MODEL = "tiny/stage_3"
CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Do one arithmetic operation on two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}, "op": {"type": "string"}},
            "required": ["a", "b", "op"],
        },
    },
}
RULES = [
    ("plus", call_text("calculator", '{"a": 2, "b": 3, "op": "add"}') + " The answer is 5."),
    ("</tool_result>", " The answer is 5."),
    ("draw", "Here it is. " + IMAGE_SPAN),
    ("count please", "one two three four five."),
]


class PartlySteered:
    """Steered rows follow ``RULES``; the others keep the real model's logits."""

    max_append = None

    def __init__(self, inner, tokenizer):
        self.inner, self.tok = inner, tokenizer
        self.steer = Steered(inner, tokenizer, RULES)
        self.media_seen: list[dict] = []

    def _mix(self, real, scripted, keyed):
        out = real.clone()
        for i, k in enumerate(keyed):
            if k:
                out[i] = -1e4
                out[i, : scripted.shape[1]] = scripted[i]
        return out

    def start(self, prompts, media=None):
        if any("explode" in self.tok.decode(p) for p in prompts):
            raise RuntimeError("this prompt breaks the model")  # a failure inside a shared generate call
        self.media_seen.extend(media or [])
        state, out = self.inner.start(prompts, media)
        scripts = [self.steer.script(p) for p in prompts]
        keyed = [s != [self.tok.eos_token_id] for s in scripts]
        scripted = ScriptedModel(
            scripts, len(self.tok), self.tok.eos_token_id, forced_brackets=self.steer.brackets
        )
        s_state, s_out = scripted.start(prompts)
        return (state, scripted, s_state, keyed), StepOutput(
            self._mix(out.logits, s_out.logits, keyed), out.hidden
        )

    def step(self, state, tokens):
        inner_state, scripted, s_state, keyed = state
        out = self.inner.step(inner_state, tokens)
        s_out = scripted.step(s_state, tokens)
        return StepOutput(self._mix(out.logits, s_out.logits, keyed), out.hidden)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_data_url(color=(255, 0, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wav_b64() -> str:
    import soundfile as sf

    buf = io.BytesIO()
    t = np.arange(16000) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tiny_stage_dir, tmp_path_factory):
    import uvicorn

    out = tmp_path_factory.mktemp("serve_out")
    rt = toollmm.load(tiny_stage_dir, output_dir=out, overrides=["inference.max_new_tokens=64"])
    steered = PartlySteered(BatchedStepModel(rt.model), rt.tokenizer)
    rt.set_step_model(steered)
    server = Server(rt, model_name=MODEL, api_key=KEY, max_batch_size=8, batch_wait_ms=150)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield client, server, steered, base
    uv.should_exit = True
    thread.join(timeout=10)
    server.batcher.close()


def _chat(client, content, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_health_and_plain_chat(served):
    client, server, _, base = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(base + "/health").json()["status"] == "ok"
    r = _chat(client, "hello there", max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    ch = r.choices[0]
    assert ch.message.role == "assistant" and isinstance(ch.message.content, str)
    assert ch.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_image_and_audio_parts_reach_the_model(served):
    client, _, steered, _ = served
    n0 = len(steered.media_seen)
    content = [
        {"type": "text", "text": "What is in this picture and this sound?"},
        {"type": "image_url", "image_url": {"url": _png_data_url()}},
        {"type": "input_audio", "input_audio": {"data": _wav_b64(), "format": "wav"}},
    ]
    r = _chat(client, content, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    seen = steered.media_seen[n0:]
    assert len(seen) == 1 and set(seen[0]) == {"image", "audio"}
    assert seen[0]["image"].pixels.shape[0] == 1 and seen[0]["audio"].pixels.shape[0] == 1
    assert float(seen[0]["image"].pixels.abs().sum()) > 0


def test_tool_call_round_trip_is_not_executed_by_the_server(served):
    client, server, _, _ = served
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[CALC])
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    [call] = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"a": 2, "b": 3, "op": "add"}
    assert "tool_results" not in (ch.message.model_extra or {})  # nothing ran server-side
    msgs += [
        ch.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": 5})},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, tools=[CALC])
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content.strip() == "The answer is 5."
    assert not r2.choices[0].message.tool_calls


def test_request_messages_render_as_the_training_record(served):
    """The OpenAI form of a tool conversation (arguments as a JSON string, tool_call_id, content parts)
    renders to exactly the ids the training renderer gives the unified record with the same tools."""
    _, server, _, _ = served
    record_msgs = [
        {"role": "user", "content": "What does 473 minus 277 give?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "calculator", "arguments": {"a": 473, "b": 277, "op": "subtract"}},
                }
            ],
        },
        {"role": "tool", "name": "calculator", "content": '{"result": 196}'},
    ]
    api_msgs = [
        {"role": "user", "content": [{"type": "text", "text": "What does 473 minus 277 give?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"op": "subtract", "a": 473, "b": 277}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 196}'},
    ]
    body = json.dumps({"model": MODEL, "messages": api_msgs, "tools": [CALC]}).encode()
    _, prompt, _, _ = server.prepare(body)
    want = server.rt.renderer.render_for_generation(record_msgs, tools=[CALC]).input_ids
    assert prompt == list(want)


def test_streaming_text_and_tool_call_deltas(served):
    client, _, _, base = served
    full = _chat(client, "count please", max_tokens=40).choices[0].message.content
    chunks = list(_chat(client, "count please", max_tokens=40, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full == "one two three four five."
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3  # really incremental
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens > 0
    # stop strings end the answer (and are not shown)
    r = _chat(client, "count please", max_tokens=40, stop=["three"])
    assert r.choices[0].message.content == "one two " and r.choices[0].finish_reason == "stop"
    s = "".join(
        c.choices[0].delta.content or ""
        for c in _chat(client, "count please", stop=["three"], stream=True)
        if c.choices
    )
    assert s == "one two "
    # tool-call deltas
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "2 plus 3?"}], tools=[CALC], stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "calculator"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"a": 2, "b": 3, "op": "add"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # the raw stream ends with [DONE]
    with httpx.stream(
        "POST",
        base + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "count please"}], "stream": True},
    ) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_image_generation_comes_back_as_a_content_part(served):
    client, server, _, _ = served
    r = _chat(client, "Please draw a red circle.", max_tokens=12)
    msg = r.choices[0].message
    parts = msg.content
    assert isinstance(parts, list), parts
    assert parts[0] == {"type": "text", "text": "Here it is. "}
    [img] = [p for p in parts if p["type"] == "image_url"]
    url = img["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert png.size[0] > 0
    [saved] = msg.model_extra["media"]
    assert (
        Path(saved["path"]).is_file() and Path(saved["path"]).parent == Path(server.rt.output_dir).resolve()
    )
    assert Path(saved["path"]).read_bytes() == base64.b64decode(url.split(",", 1)[1])


def test_errors_use_the_api_shape_and_the_server_survives(served, tiny_stage_dir):
    client, server, _, base = served
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", temperature="hot")
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "word " * 1500)
    msg = e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in msg
    prompt_len = int(msg.split("the request has ")[1].split()[0])
    assert prompt_len > 1024
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hello", max_tokens=2000)
    assert "2000 completion tokens" in e.value.body["message"] and "1024" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    bad_key = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(base + "/v1/models").status_code == 401
    garbage = "data:image/png;base64," + base64.b64encode(b"this is not a png").decode()
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": garbage}}]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, content)
    assert e.value.body["param"] == "messages[0].content[1]" and e.value.body["code"] == "invalid_media"
    content[1] = {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, content)
    assert e.value.body["param"] == "messages[0].content[1].image_url"
    content[1] = {"type": "image_url", "image_url": {"url": "/etc/passwd"}}
    with pytest.raises(openai.BadRequestError):
        _chat(client, content)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "[IMG0] injected")
    assert e.value.body["param"] == "messages"
    # still serving
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert _chat(client, "still there?", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_client_disconnect_mid_stream_frees_its_row(served):
    client, server, _, base = served
    before = server.batcher.finished["cancelled"]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "stream": True,
        "max_tokens": 800,
    }
    with httpx.stream(
        "POST", base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        it = resp.iter_lines()
        got = [next(it) for _ in range(4)]
    assert any(g.startswith("data: ") for g in got)
    for _ in range(200):
        if server.batcher.finished["cancelled"] > before:
            break
        time.sleep(0.05)
    assert server.batcher.finished["cancelled"] == before + 1
    assert _chat(client, "next one", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_sixteen_concurrent_clients_are_batched_without_failures(served):
    client, server, _, _ = served
    n0 = len(server.batcher.batch_sizes)
    prompts = [f"question number {i}: what colour is the sky?" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: _chat(client, p, max_tokens=6, seed=7), prompts))
    assert len(results) == 16 and all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    sizes = server.batcher.batch_sizes[n0:]
    assert sum(sizes) == 16 and max(sizes) > 1 and max(sizes) <= 8


def test_same_greedy_request_alone_and_in_a_batch_of_eight(served):
    """Through the server: the answer to A alone equals A's answer when 7 different requests share its
    batch (real logits, batched step model)."""
    client, server, _, _ = served
    a = "describe a quiet morning by the lake"
    alone = _chat(client, a, max_tokens=12, temperature=0)
    n0 = len(server.batcher.batch_sizes)
    others = [
        f"other request {i} about {w}" for i, w in enumerate("cats dogs rain snow sun wind fog".split())
    ]
    with ThreadPoolExecutor(9) as pool:  # a long request keeps the worker busy while the 8 queue up
        blocker = pool.submit(_chat, client, "a long blocker", max_tokens=400, temperature=0)
        for _ in range(400):
            if server.batcher.busy:
                break
            time.sleep(0.01)
        results = list(pool.map(lambda p: _chat(client, p, max_tokens=12, temperature=0), [a, *others]))
        blocker.result()
    assert 8 in server.batcher.batch_sizes[n0:]
    assert results[0].choices[0].message.content == alone.choices[0].message.content
    assert results[0].usage == alone.usage


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_decode_tokens_do_not_depend_on_batch_mates(tiny_stage_dir, tmp_path, attn):
    """Engine level, the real ``ToolLMM`` under each attention kernel: greedy token ids of a request alone
    equal its ids inside a batch of 8 different requests, with a forced multi-token chunk (a ragged
    append) in another row; and they equal the one-forward-per-row step model's ids."""
    rt = toollmm.load(
        tiny_stage_dir, output_dir=tmp_path, overrides=[f"model.llm.attn_implementation={attn}"]
    )
    from toollmm.infer.requests import Request

    texts = ["describe a quiet morning by the lake"] + [f"another prompt {i} " * (i + 1) for i in range(7)]
    prompts = [rt.prompt(Request(messages=[{"role": "user", "content": t}])) for t in texts]
    rt.set_step_model(BatchedStepModel(rt.model))
    opts = [RowOptions(max_new_tokens=16, temperature=0.0)] * 8
    alone = rt.engine.generate(prompts[:1], [{}], options=opts[:1])[0].token_ids
    forced = list(opts)
    forced[3] = RowOptions(
        max_new_tokens=16, prefix=rt.tokenizer.encode("a b c d e", add_special_tokens=False)
    )
    batch = rt.engine.generate(prompts, [{}] * 8, options=forced)
    assert batch[0].token_ids == alone and len(alone) == 16
    rt.set_step_model(ToolLMMStepModel(rt.model))
    assert rt.engine.generate(prompts[:1], [{}], options=opts[:1])[0].token_ids == alone


def test_row_options_seed_banned_prefix_and_stop(tiny_stage_dir, tmp_path):
    """Per-row options on the engine: a row's sampled tokens depend on its own seed only; a banned id is
    never sampled; a prefix is taken as the row's first tokens (a forced tool call is parsed)."""
    rt = toollmm.load(tiny_stage_dir, output_dir=tmp_path)
    rt.set_step_model(BatchedStepModel(rt.model))
    from toollmm.infer.requests import Request

    p = rt.prompt(Request(messages=[{"role": "user", "content": "say something"}]))
    q = rt.prompt(Request(messages=[{"role": "user", "content": "say something else entirely"}]))
    hot = RowOptions(max_new_tokens=10, temperature=1.5, seed=11)
    a = rt.engine.generate([p], [{}], options=[hot])[0].token_ids
    b = rt.engine.generate(
        [q, p], [{}, {}], options=[RowOptions(max_new_tokens=10, temperature=1.5, seed=3), hot]
    )
    assert b[1].token_ids == a
    top = rt.engine.generate([p], [{}], options=[RowOptions(max_new_tokens=1)])[0].token_ids[0]
    banned = rt.engine.generate([p], [{}], options=[RowOptions(max_new_tokens=1, banned=[top])])[0].token_ids
    assert banned and banned[0] != top
    call = rt.tokenizer.encode(
        call_text("calculator", '{"a": 1, "b": 2, "op": "add"}'), add_special_tokens=False
    )
    row = rt.engine.generate(
        [p], [{}], options=[RowOptions(max_new_tokens=5, prefix=call)], stop_at_tool_call=True
    )[0]
    assert row.finish_reason == "tool_call" and row.tool_results[0].name == "calculator"
    assert (
        row.tool_results[0].arguments == {"a": 1, "b": 2, "op": "add"} and row.tool_results[0].result is None
    )


def _entry():
    return load_script("code/serve.py", "serve_entry")


def test_cli_binds_localhost_and_requires_its_key(tiny_stage_dir, tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "code" / "serve.py"),
            "--checkpoint",
            str(tiny_stage_dir),
            "--port",
            str(port),
            "--api-key",
            "k1",
            "--output-dir",
            str(tmp_path),
            "inference.max_new_tokens=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        name = _entry().model_name(str(tiny_stage_dir))
        c = openai.OpenAI(base_url=base + "/v1", api_key="k1", max_retries=0)
        assert [m.id for m in c.models.list().data] == [name]
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens <= 2
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        conns = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if conns.strip():
            assert conns.split()[3] == f"127.0.0.1:{port}"  # local address: this machine only
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "/v1/chat/completions 200 prompt=" in out  # one log line per request


def test_run_tools_executes_the_checkpoints_tool_server_side(served):
    """``--run-tools``: the registry runs the call (sandboxed, as inference.py does) and the answer after
    the tool result comes back; the calls are reported in the ``tool_results`` extension."""
    from fastapi.testclient import TestClient

    _, server, _, _ = served
    runner = Server(server.rt, model_name=MODEL, run_tools=True, batch_wait_ms=0)
    try:
        with TestClient(build_app(runner)) as tc:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
                "tools": [CALC],
            }
            r = tc.post("/v1/chat/completions", json=body).json()
    finally:
        runner.batcher.close()
    msg = r["choices"][0]["message"]
    assert r["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in msg
    assert msg["content"].strip() == "The answer is 5."
    [ran] = msg["tool_results"]
    assert ran["name"] == "calculator" and ran["error"] is None and "5" in ran["result"]


def test_a_lone_client_does_not_pay_the_batch_wait(served):
    """``serve.batch_wait_ms`` is spent only when batch-mates are likely (several clients active)."""
    from fastapi.testclient import TestClient

    _, server, _, _ = served
    slow = Server(server.rt, model_name=MODEL, batch_wait_ms=3000)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    try:
        with TestClient(build_app(slow)) as tc:
            for _ in range(2):
                t0 = time.perf_counter()
                assert tc.post("/v1/chat/completions", json=body).status_code == 200
                assert time.perf_counter() - t0 < 2.0
    finally:
        slow.batcher.close()
    assert slow.batcher.batch_sizes == [1, 1]


def test_a_generated_image_echoed_back_stays_in_the_history(served):
    """Clients append the assistant message as they got it (content parts with our data: URL): the next
    turn renders that turn with its signal span, as the chat session records it."""
    client, server, _, _ = served
    first = [{"role": "user", "content": "Please draw a red circle."}]
    r = client.chat.completions.create(model=MODEL, messages=first, max_tokens=12)
    msgs = [*first, r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "thanks"}]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert r2.choices[0].finish_reason in ("stop", "length")
    _, prompt, _, _ = server.prepare(json.dumps({"model": MODEL, "messages": msgs}).encode())
    span = server.rt.tokenizer.encode(IMAGE_SPAN, add_special_tokens=False)
    assert any(prompt[i : i + len(span)] == span for i in range(len(prompt)))


def test_a_request_that_breaks_generation_fails_alone(served):
    """A generate call that raises fails only the request that causes it: its batch-mates are rerun and
    answered, it gets a 500 in the API's error shape, and the server keeps serving."""
    client, server, _, _ = served
    n0 = len(server.batcher.batch_sizes)
    with ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(_chat, client, "another long blocker", max_tokens=300, temperature=0)
        for _ in range(400):
            if server.batcher.busy:
                break
            time.sleep(0.01)
        futs = [
            pool.submit(_chat, client, t, max_tokens=4) for t in ("fine one", "please explode", "fine two")
        ]
        outcomes = []
        for f in futs:
            try:
                outcomes.append(f.result().choices[0].finish_reason)
            except openai.InternalServerError as e:
                outcomes.append(e.body)
        blocker.result()
    assert 3 in server.batcher.batch_sizes[n0:]
    assert outcomes[0] in ("stop", "length") and outcomes[2] in ("stop", "length")
    assert outcomes[1]["type"] == "server_error" and "breaks the model" in outcomes[1]["message"]
    assert _chat(client, "after the failure", max_tokens=2).choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------ continuous batching
class _Breaks(BatchedStepModel):
    """The real batched step model, except that a prompt containing "explode" breaks its prefill and
    ``fail_next_step`` makes the next decode step raise once."""

    fail_next_step = False

    def start(self, prompts, media=None):
        if any("explode" in self.tok.decode(p) for p in prompts):
            raise RuntimeError("this prompt breaks the model")
        return super().start(prompts, media)

    def step(self, state, tokens):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("a step that breaks")
        return super().step(state, tokens)


def _job(server, text, no_eos=False, **opts):
    """A request prepared as the HTTP handler prepares it, submitted to the server's batcher (``no_eos``:
    it runs its whole token budget)."""
    from toollmm.serve.batcher import Job

    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], **opts}
    _, prompt, media, ro = server.prepare(json.dumps(body).encode())
    done, box = threading.Event(), {}

    def on_event(kind, payload):
        if kind in ("done", "error", "cancelled"):
            box["kind"], box["payload"] = kind, payload
            done.set()

    if no_eos:
        ro.banned = [server.rt.tokenizer.eos_token_id]
    job = Job(prompt, media, ro, False, on_event)
    job.wait = lambda: (done.wait(120), box)[1]
    server.batcher.submit(job)
    return job


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def continuous(request, tiny_stage_dir, tmp_path_factory):
    """A server on the real ``ToolLMM`` + batched step model under each attention kernel, continuous
    batching on (the default)."""
    out = tmp_path_factory.mktemp(f"cont_{request.param}")
    rt = toollmm.load(
        tiny_stage_dir,
        output_dir=out,
        overrides=["inference.max_new_tokens=64", f"model.llm.attn_implementation={request.param}"],
    )
    model = _Breaks(rt.model)
    model.tok = rt.tokenizer
    rt.set_step_model(model)
    server = Server(rt, model_name=MODEL, max_batch_size=8)
    yield server
    server.batcher.close()


def test_requests_join_a_running_batch_and_answer_as_alone(continuous):
    """Continuous batching: requests that arrive while a batch is decoding join it between steps (they do
    not wait for it to end); a greedy request and a sampled one with its own seed give the same tokens
    alone and joined into a running batch of 8 different requests, on the real step model."""
    server = continuous
    b = server.batcher
    greedy = dict(temperature=0, max_tokens=12)
    sampled = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone_g = _job(server, "describe a quiet morning by the lake", **greedy).wait()["payload"].token_ids
    alone_s = _job(server, "name three colours", **sampled).wait()["payload"].token_ids
    joined0, steps0, rows0 = b.joined, b.steps, b.step_rows
    blocker = _job(server, "a long blocker", no_eos=True, temperature=0, max_tokens=60)
    for _ in range(400):
        if b.steps > steps0:
            break
        time.sleep(0.01)
    jobs = []
    for i, w in enumerate("cats dogs rain snow sun wind".split()):
        jobs.append(_job(server, f"other request {i} about {w}", temperature=0.7, seed=i, max_tokens=4 + i))
        time.sleep(0.01)
    g = _job(server, "describe a quiet morning by the lake", **greedy)
    s = _job(server, "name three colours", **sampled)
    results = [j.wait() for j in (g, s, blocker, *jobs)]
    assert all(r["kind"] == "done" for r in results)
    assert results[0]["payload"].token_ids == alone_g and len(alone_g) > 0
    assert results[1]["payload"].token_ids == alone_s and len(alone_s) > 0
    assert len(results[2]["payload"].token_ids) == 60
    assert b.joined - joined0 >= 8  # every request after the blocker joined a decoding batch
    assert (b.step_rows - rows0) / (b.steps - steps0) > 2  # steps carried several rows at once


def test_a_request_that_breaks_prefill_fails_alone_in_a_running_batch(continuous):
    server = continuous
    b = server.batcher
    steps0 = b.steps
    blocker = _job(server, "a long blocker", no_eos=True, temperature=0, max_tokens=40)
    for _ in range(400):
        if b.steps > steps0:
            break
        time.sleep(0.01)
    jobs = [_job(server, t, max_tokens=4) for t in ("fine one", "please explode", "fine two")]
    fine1, boom, fine2 = (j.wait() for j in jobs)
    assert fine1["kind"] == "done" and fine2["kind"] == "done"
    assert boom["kind"] == "error" and "breaks the model" in boom["payload"]
    assert blocker.wait()["kind"] == "done" and len(blocker.wait()["payload"].token_ids) == 40
    assert _job(server, "after the failure", max_tokens=2).wait()["kind"] == "done"


def test_a_cancelled_row_leaves_the_running_batch(continuous):
    server = continuous
    b = server.batcher
    before, steps0 = b.finished["cancelled"], b.steps
    stay, go = (_job(server, t, no_eos=True, temperature=0, max_tokens=50) for t in ("stays", "goes away"))
    for _ in range(400):
        if b.steps > steps0 + 3:
            break
        time.sleep(0.01)
    go.cancelled.set()
    got = go.wait()
    assert got["kind"] == "done" and got["payload"].finish_reason == "cancelled"
    assert len(got["payload"].token_ids) < 50 and b.finished["cancelled"] == before + 1
    assert len(stay.wait()["payload"].token_ids) == 50


def test_a_step_that_breaks_reruns_each_row_alone(continuous):
    """A decode step of the running batch that raises: every row is rerun alone and answered (the same
    greedy tokens as a clean run), and the server keeps serving."""
    server = continuous
    b = server.batcher
    greedy = dict(no_eos=True, temperature=0, max_tokens=16)
    clean = [_job(server, f"steady request {i}", **greedy).wait()["payload"].token_ids for i in range(3)]
    steps0 = b.steps
    jobs = [_job(server, f"steady request {i}", **greedy) for i in range(3)]
    for _ in range(400):
        if b.steps > steps0:
            break
        time.sleep(0.005)
    server.rt.step_model.fail_next_step = True
    got = [j.wait() for j in jobs]
    assert [g["kind"] for g in got] == ["done"] * 3
    assert [g["payload"].token_ids for g in got] == clean
    assert not server.rt.step_model.fail_next_step  # the failure did happen
    assert _job(server, "after the failure", max_tokens=2).wait()["kind"] == "done"
