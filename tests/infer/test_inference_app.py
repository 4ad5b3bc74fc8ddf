"""``code/app.py``: the gradio demo served on 127.0.0.1 (analytics off) and driven with ``gradio_client``:
uploads reach the model, tool calls are visible, generated media come back, sessions are separate."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import toollmm
from entry_points import load_script
from inference_fixtures import IMAGE_SPAN, call_text, steer


def _entry():
    return load_script("code/app.py", "app_entry")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_stage_dir, tmp_path_factory):
    app_mod = _entry()
    rt = steer(
        toollmm.load(tiny_stage_dir, output_dir=tmp_path_factory.mktemp("app_out")),
        [
            ("plus", call_text("calculator", '{"a": 2, "b": 3, "op": "add"}') + " The answer is 5."),
            ("draw", "Here it is. " + IMAGE_SPAN),
            ("this picture", "A picture."),
        ],
    )
    seen = []
    inner = rt.step_model.start

    def start(prompts, media=None):
        seen.extend(media)
        return inner(prompts, media)

    rt.step_model.start = start
    port = _free_port()
    app = app_mod.launch(rt, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/", rt, seen
    app.close()


def test_app_chat_shows_tool_calls_media_and_takes_uploads(served, tmp_path):
    from gradio_client import Client, handle_file

    url, rt, seen = served
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    client = Client(url, verbose=False)
    _, chat, result = client.predict({"text": "what is 2 plus 3", "files": []}, api_name="/chat")
    tool_msgs = [m for m in chat if (m.get("metadata") or {}).get("title", "").startswith("🛠️ calculator")]
    assert len(tool_msgs) == 1 and 'result: {"result": 5}' in tool_msgs[0]["content"][0]["text"]
    assert (
        result["tool_calls"][0]["result"] == '{"result": 5}' and result["text"].strip() == "The answer is 5."
    )

    _, chat, result = client.predict({"text": "now draw a square", "files": []}, api_name="/chat")
    # gradio serves every {"path": ...} it returns: the client receives the generated file itself
    [media] = result["media"]
    [file_msg] = [m for m in chat if m["content"] and m["content"][0].get("type") == "file"]
    assert Image.open(media).format == "PNG" and Image.open(file_msg["content"][0]["file"]).format == "PNG"
    assert rt.sink.items[-1]["modality"] == "image" and Path(rt.sink.items[-1]["path"]).is_file()

    img = tmp_path / "upload.png"
    Image.fromarray(np.full((24, 24, 3), 90, dtype=np.uint8)).save(img)
    _, chat, result = client.predict(
        {"text": "what is in this picture", "files": [handle_file(str(img))]}, api_name="/chat"
    )
    assert result["text"].strip() == "A picture." and result["errors"] == []
    assert "image" in seen[-1] and len(seen[-1]["image"].pixels) == 1  # the upload reached the encoder
    # the same session kept its history: 3 user turns so far
    assert sum(1 for m in chat if m["role"] == "user") == 4  # 3 texts + 1 upload

    other = Client(url, verbose=False)  # a second browser: its own conversation
    _, chat2, _ = other.predict({"text": "draw", "files": []}, api_name="/chat")
    assert sum(1 for m in chat2 if m["role"] == "user") == 1
    chat_after_clear, _ = client.predict(api_name="/clear")
    assert chat_after_clear == []
