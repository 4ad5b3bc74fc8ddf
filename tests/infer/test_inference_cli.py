"""``code/inference.py`` in-process on a tiny stage folder: ``--json``, media flags, ``--batch``, ``--chat`` on
scripted stdin, terminal streaming, config layering, and bad input named before the model loads."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import toollmm
from entry_points import load_script
from inference_fixtures import IMAGE_SPAN, call_text, steer
from toollmm.core.paths import REPO_ROOT

KEYS = {"text", "tool_calls", "media", "errors", "timings"}
RULES = [
    ("draw", "Here it is. " + IMAGE_SPAN),
    ("plus", call_text("calculator", '{"a": 2, "b": 3, "op": "add"}') + " The answer is 5."),
    ("ask me", "Sure, it is red."),
]


def _entry():
    return load_script("code/inference.py", "inference_entry")


cli = _entry()


class Loader:
    """``toollmm.load`` + steering; remembers each prompt's text and media."""

    def __init__(self):
        self.calls = 0
        self.seen: list[tuple[str, dict]] = []

    def __call__(self, checkpoint, **kwargs):
        self.calls += 1
        rt = steer(toollmm.load(checkpoint, **kwargs), RULES)
        inner = rt.step_model.start

        def start(prompts, media=None):
            self.seen += [(rt.tokenizer.decode(p), m) for p, m in zip(prompts, media)]
            return inner(prompts, media)

        rt.step_model.start = start
        return rt


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_media")
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(d / "red.png")
    sf.write(d / "tone.wav", 0.1 * np.sin(np.linspace(0, 800, 16000)), 16000)
    return d


def run(argv, capsys, loader=None, stdin=None):
    rc = cli.main([str(a) for a in argv], loader=loader, stdin=stdin)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_prints_one_result_object(tiny_stage_dir, tmp_path, capsys):
    loader = Loader()
    argv = [
        "--checkpoint",
        tiny_stage_dir,
        "--prompt",
        "what is 2 plus 3",
        "--json",
        "--output-dir",
        tmp_path,
    ]
    rc, out, _ = run(argv, capsys, loader)
    assert rc == 0 and len(out.strip().splitlines()) == 1
    res = json.loads(out)
    assert set(res) == KEYS and set(res["timings"]) == {"load_s", "first_token_s", "total_s"}
    assert res["tool_calls"] == [
        {"name": "calculator", "arguments": {"a": 2, "b": 3, "op": "add"}, "result": '{"result": 5}', "error": None,
         "duration_s": res["tool_calls"][0]["duration_s"]}
    ]  # fmt: skip
    assert res["text"].strip() == "The answer is 5." and res["errors"] == []


def test_media_flags_keep_their_order_and_get_placeholders(tiny_stage_dir, tmp_path, media, capsys):
    loader = Loader()
    argv = ["--checkpoint", tiny_stage_dir, "--audio", media / "tone.wav", "--image", media / "red.png",
            "--prompt", "please draw", "--json", "--output-dir", tmp_path]  # fmt: skip
    rc, out, _ = run(argv, capsys, loader)
    res = json.loads(out)
    assert (
        rc == 0
        and res["media"][0]["modality"] == "image"
        and res["media"][0]["path"].startswith(str(tmp_path))
    )
    text, m = loader.seen[0]
    assert text.index("<audio>") < text.index("<image>") < text.index("please draw")  # command-line order
    assert sorted(m) == ["audio", "image"] and len(m["image"].pixels) == len(m["audio"].pixels) == 1


def test_batch_writes_one_object_per_line_with_its_id(tiny_stage_dir, tmp_path, media, capsys):
    (tmp_path / "red.png").write_bytes((media / "red.png").read_bytes())
    lines = [
        {"id": "q1", "prompt": "what is 2 plus 3"},
        {"id": "r2", "messages": [{"role": "user", "content": "please draw a red square"},
                                  {"role": "assistant", "content": "reference answer, cut off"}]},
        {"prompt": "ask me about it", "images": ["red.png"]},
    ]  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    loader = Loader()
    argv = ["--checkpoint", tiny_stage_dir, "--batch", src, "--out", tmp_path / "o" / "out.jsonl",
            "--batch-size", 2, "--output-dir", tmp_path / "media"]  # fmt: skip
    rc, _, err = run(argv, capsys, loader)
    assert rc == 0 and "3 results" in err
    got = [json.loads(x) for x in (tmp_path / "o" / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [g["id"] for g in got] == ["q1", "r2", "3"] and all(set(g) == KEYS | {"id"} for g in got)
    assert got[0]["tool_calls"][0]["result"] == '{"result": 5}'
    assert got[1]["media"][0]["modality"] == "image" and "reference answer" not in loader.seen[1][0]
    assert got[2]["text"].strip() == "Sure, it is red." and "image" in loader.seen[2][1]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "x", "images": ["nope.png"]}', "images[0]: file not found"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "no user message"),
        ('{"text": "x"}', "needs `messages`"),
    ],
)
def test_bad_batch_lines_are_named_before_loading(tiny_stage_dir, tmp_path, capsys, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    loader = Loader()
    rc, _, err = run(
        ["--checkpoint", tiny_stage_dir, "--batch", src, "--out", tmp_path / "o.jsonl"], capsys, loader
    )
    assert rc == 2 and f"{src}:2" in err and message in err and loader.calls == 0


def test_missing_media_and_bad_arguments(tiny_stage_dir, tmp_path, capsys):
    loader = Loader()
    rc, _, err = run(
        ["--checkpoint", tiny_stage_dir, "--image", tmp_path / "x.png", "--prompt", "hi"], capsys, loader
    )
    assert rc == 2 and "--image" in err and "x.png" in err and loader.calls == 0
    with pytest.raises(SystemExit):
        cli.parse_args(["--checkpoint", "x", "--batch", "in.jsonl"])  # --batch needs --out
    with pytest.raises(SystemExit):
        cli.parse_args(["--checkpoint", "x"])  # nothing to do


def test_chat_on_scripted_stdin_keeps_history_and_media(tiny_stage_dir, tmp_path, media, capsys):
    loader = Loader()
    stdin = io.StringIO(
        f"what is 2 plus 3\n/image {media / 'red.png'}\nask me about it\n/image {tmp_path / 'missing.png'}\n"
        "/reset\nplease draw\n"
    )
    argv = ["--checkpoint", tiny_stage_dir, "--chat", "--json", "--output-dir", tmp_path]
    rc, out, err = run(argv, capsys, loader, stdin)
    turns = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and len(turns) == 3 and "missing.png" in err
    assert turns[0]["tool_calls"][0]["result"] == '{"result": 5}'
    assert turns[1]["text"].strip() == "Sure, it is red." and turns[2]["media"][0]["modality"] == "image"
    (t1, m1), (t2, m2), (t3, m3) = loader.seen
    assert "image" in m2 and "2 plus 3" in t2 and "The answer is 5." in t2  # history + media in turn 2
    assert "2 plus 3" not in t3 and m3 == {}  # after /reset


def test_terminal_mode_streams_text_and_shows_tools(tiny_stage_dir, tmp_path, capsys):
    rc, out, err = run(
        ["--checkpoint", tiny_stage_dir, "--prompt", "what is 2 plus 3", "--output-dir", tmp_path],
        capsys,
        Loader(),
    )
    assert rc == 0 and f"outputs in {tmp_path}" in err
    assert out.startswith(" The answer is 5.") or out.startswith("The answer is 5.")
    assert '[tool] calculator({"a": 2, "b": 3, "op": "add"}) -> {"result": 5}' in out


def test_config_layers(tiny_stage_dir, tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("inference:\n  top_p: 0.5\n", encoding="utf-8")
    argv = ["--checkpoint", tiny_stage_dir, "--print-config", "--config", extra, "--tools", "calculator,weather",
            "inference.seed=7"]  # fmt: skip
    rc, out, _ = run(argv, capsys)
    import yaml

    inf = yaml.safe_load(out)["inference"]
    assert rc == 0 and inf["max_new_tokens"] == 200  # the checkpoint's own (config/inference.yaml sets none)
    assert inf["tool_sets"] == ["builtin", "gpt4tools"]  # the checkpoint's own (not in inference.yaml)
    assert inf["tool_imports"] == ["toollmm.demo.toolset"]  # the checkpoint's own: a module of this package
    assert inf["top_p"] == 0.5 and inf["seed"] == 7 and inf["tools"] == ["calculator", "weather"]


def test_unsteered_tiny_checkpoint_answers_in_json(tiny_stage_dir, tmp_path, capsys):
    argv = ["--checkpoint", tiny_stage_dir, "--prompt", "hello there", "--json", "--output-dir", tmp_path,
            "inference.max_new_tokens=6"]  # fmt: skip
    rc, out, _ = run(argv, capsys)
    res = json.loads(out)
    assert rc == 0 and set(res) == KEYS and res["timings"]["load_s"] > 0 and isinstance(res["text"], str)


@pytest.mark.slow
def test_entry_script_in_a_subprocess(tiny_stage_dir, tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "code" / "inference.py"), "--checkpoint", str(tiny_stage_dir),
           "--prompt", "hi", "--json", "--output-dir", str(tmp_path), "inference.max_new_tokens=4"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(proc.stdout)) == KEYS
