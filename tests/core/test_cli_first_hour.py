"""A new user's first hour with the command lines (issue 21, items 8, 9 and 11): what inference.py, app.py,
train.py, train.sh and evaluate.py print, and where a config error or a busy port is blamed. In-process
``main(argv)`` on the tiny stage folder of tests/inference_fixtures.py, the real models and libraries."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys

import pytest
import yaml
from test_evaluate_cli import Scripted, three  # noqa: F401  (``three`` is a fixture)
from test_evaluate_cli import evaluate as evaluate_cli
from test_inference_cli import Loader
from test_inference_cli import cli as inference_cli

import toollmm
from entry_points import load_script
from toollmm.checkpoint.stage import stage_config
from toollmm.core.config import ConfigError, load_config
from toollmm.core.paths import REPO_ROOT
from toollmm.infer.runtime import INFERENCE_YAML


def _app():
    return load_script("code/app.py", "app_entry_first_hour")


app_cli = _app()


def _run(argv, capsys, **kwargs):
    rc = inference_cli.main([str(a) for a in argv], **kwargs)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------ item 8
def test_library_progress_bars_stay_off_the_streamed_answer(tiny_stage_dir, tmp_path, capsys):
    """The answer streams, then the image decoder loads lazily (mid-turn): no library bar, no carriage
    return, in either stream; our own progress lines are on stderr, each on its own line."""
    argv = ["--checkpoint", tiny_stage_dir, "--prompt", "please draw a red circle", "--output-dir", tmp_path]
    rc, out, err = _run(argv, capsys, loader=Loader())
    assert rc == 0 and (tmp_path / "image_0.png").is_file()  # the decoder really loaded and ran
    assert "\r" not in out and "\r" not in err, err
    assert "Loading weights" not in err and "Loading pipeline components" not in err
    assert out.splitlines()[0].strip() == "Here it is." and "[image]" in out
    assert err.splitlines()[0] == f"inference.py: loading {tiny_stage_dir}"
    assert f"outputs in {tmp_path}" in err.splitlines()[1]


# ------------------------------------------------------------------------------------------ item 9
@pytest.mark.parametrize("entry", ["inference", "app"])
def test_print_config_shows_each_values_source(entry, tiny_stage_dir, tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("inference:\n  top_p: 0.5\n", encoding="utf-8")
    argv = ["--checkpoint", str(tiny_stage_dir), "--print-config", "--config", str(extra), "inference.seed=7"]
    rc = (inference_cli if entry == "inference" else app_cli).main(argv)
    out = capsys.readouterr().out
    lines = {ln.strip().split(":")[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    saved = f"{tiny_stage_dir}/config.yaml"
    assert rc == 0
    assert lines["max_new_tokens"].endswith(f"# [{saved}] generation budget per turn")
    assert f"# [{extra}]" in lines["top_p"] and "# [override inference.seed]" in lines["seed"]
    assert f"# [{tiny_stage_dir}/tokenizer]" in lines["tokenizer"]  # what the loader pins, said as such
    cfg = yaml.safe_load(out)  # still YAML: the sources are comments
    assert cfg["inference"]["top_p"] == 0.5 and cfg["inference"]["seed"] == 7
    assert cfg["model"]["llm"]["tokenizer"] == f"{tiny_stage_dir}/tokenizer"


def test_the_checkpoints_max_new_tokens_stands_over_inference_yaml(tiny_stage_dir):
    """config/demo.yaml sets inference.max_new_tokens 64 for its checkpoints; inference must use it."""
    assert stage_config(tiny_stage_dir).inference.max_new_tokens == 200  # saved by the fixture
    assert stage_config(tiny_stage_dir, config_files=[INFERENCE_YAML]).inference.max_new_tokens == 200
    over = stage_config(tiny_stage_dir, ["inference.max_new_tokens=9"], [INFERENCE_YAML])
    assert over.inference.max_new_tokens == 9
    demo = load_config(stage=3, config_files=["config/demo.yaml"]).config
    assert demo.inference.max_new_tokens == 64


# ------------------------------------------------------------------------------------------ item 11
def test_chat_unknown_command_is_not_sent_to_the_model(tiny_stage_dir, tmp_path, capsys):
    loader = Loader()
    stdin = io.StringIO("/foo bar\n//foo is a path\n")
    argv = ["--checkpoint", tiny_stage_dir, "--chat", "--json", "--output-dir", tmp_path]
    rc, out, err = _run(argv, capsys, loader=loader, stdin=stdin)
    assert rc == 0 and "unknown command /foo" in err
    assert all(c in err for c in ("/image", "/video", "/audio", "/reset", "/help", "/quit"))
    assert len(out.splitlines()) == 1 and len(loader.seen) == 1  # only the '//' line reached the model
    assert "/foo is a path" in loader.seen[0][0] and "//foo" not in loader.seen[0][0]


def test_chat_missing_media_names_the_chat_command(tiny_stage_dir, tmp_path, capsys):
    stdin = io.StringIO(f"/image {tmp_path / 'missing.png'}\n")
    argv = ["--checkpoint", tiny_stage_dir, "--chat", "--json", "--output-dir", tmp_path]
    rc, _, err = _run(argv, capsys, loader=Loader(), stdin=stdin)
    assert rc == 0 and f"/image {tmp_path / 'missing.png'}: file not found" in err and "--image" not in err


def test_unknown_tool_name_lists_the_valid_ones(tiny_stage_dir, tmp_path, capsys):
    argv = [
        "--checkpoint",
        tiny_stage_dir,
        "--prompt",
        "hi",
        "--tools",
        "calculater",
        "--output-dir",
        tmp_path,
    ]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "'calculater'" in err and "did you mean 'calculator'" in err
    assert "unit_convert" in err or "weather" in err  # the valid names are listed


@pytest.mark.parametrize("entry", ["inference", "app"])
def test_override_example_in_help_is_an_inference_key(entry, capsys):
    with pytest.raises(SystemExit):
        (inference_cli if entry == "inference" else app_cli).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "e.g. inference.temperature=0.7" in text and "train." not in text


def test_train_sh_help_is_its_header_only():
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "train.sh"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert out.startswith("scripts/train.sh — run one training stage") and "DS_LAUNCHER_ARGS" in out
    assert "set -euo" not in out and "source " not in out and "#" not in out.splitlines()[0]


def test_app_on_a_busy_port_says_so_before_loading(tiny_stage_dir, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(toollmm, "load", lambda *a, **k: loads.append(a))  # must not be reached
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = app_cli.main(["--checkpoint", str(tiny_stage_dir), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and loads == []
    assert f"127.0.0.1:{port}" in err and "in use" in err and "--port" in err and "Traceback" not in err


def test_config_error_blames_the_layer_that_set_the_value():
    with pytest.raises(ConfigError) as e:
        load_config(stage=3, config_files=["config/demo.yaml"], overrides=["data.train.path=x.jsonl"])
    [problem] = e.value.problems
    assert problem.startswith("data.train: expected a list") and "(from override data.train.path)" in problem
    assert "demo.yaml" not in problem


def test_output_means_a_folder_for_score_and_run(three, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "stage_3"
    ckpt.mkdir()
    argv = ["run", "--benchmark", "viot", "--checkpoint", str(ckpt), "--data", str(three)]
    assert (
        evaluate_cli.main(
            [*argv, "--output", str(tmp_path / "ran")], generator_factory=lambda c, b: Scripted()
        )
        == 0
    )
    ran = json.loads((tmp_path / "ran" / "viot.json").read_text(encoding="utf-8"))
    preds = tmp_path / "ran" / "viot.predictions.jsonl"
    argv = ["score", "--benchmark", "viot", "--references", str(three), "--predictions", str(preds)]
    assert evaluate_cli.main([*argv, "--output", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "viot.json").read_text(encoding="utf-8"))
    assert scored["metrics"] == ran["metrics"]
    capsys.readouterr()
    for sub in ("score", "run", "demo"):
        with pytest.raises(SystemExit):
            evaluate_cli.main([sub, "--help"])
        assert "--output DIR" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ item 10
def _train_entry():
    return load_script("code/train.py", "train_entry_first_hour")


class Terminal:
    """A pseudo-terminal 120 columns wide: ``file`` writes to it, ``text()`` is what it received (with the
    line discipline's CR LF turned back into LF)."""

    def __init__(self):
        import fcntl
        import os
        import pty
        import struct
        import termios
        import threading

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.file = io.TextIOWrapper(
            os.fdopen(slave, "wb", buffering=0), encoding="utf-8", write_through=True
        )
        self.chunks: list[bytes] = []

        def read():
            while True:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    return
                if not data:
                    return
                self.chunks.append(data)

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def text(self) -> str:
        import os

        self.file.close()
        self.reader.join(timeout=10)
        os.close(self.master)
        return b"".join(self.chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def test_log_lines_go_above_the_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    import logging
    import re

    from toollmm.train.tracking import Tracker, setup_logging

    term = Terminal()
    root = logging.getLogger()
    monkeypatch.setattr(sys, "stderr", term.file)
    monkeypatch.setattr(root, "handlers", [])  # a command line: no handler yet
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.delenv("TOOLLMM_NO_TQDM", raising=False)
    setup_logging(0, "INFO")
    tracker = Tracker(tmp_path, 0, total_steps=6, run_name="tty-stage1")
    for step in range(1, 7):
        tracker.advance(1, loss=1.0 / step)
        if step % 2 == 0:
            tracker.log({"loss": 1.0 / step}, step)
            logging.getLogger("toollmm.data.stream").info("a line from elsewhere at step %d", step)
    tracker.close()
    [handler] = root.handlers
    out = term.text()
    handler.close()
    assert "tty-stage1:" in out and "%|" in out  # the bar was drawn
    lines = [seg for seg in out.split("\n") if " INFO " in seg]
    # the tracker's three step lines and the three from elsewhere (a thread an earlier test left running may
    # log a line of its own in between: it is held to the same rule below, but not counted; CI 2026-12-05)
    ours = [seg for seg in lines if " toollmm.train.tracking: " in seg or "a line from elsewhere" in seg]
    assert len(ours) == 6, lines
    for seg in lines:  # each log line starts a line of its own once the bar is cleared from it
        shown = seg.rsplit("\r", 1)[-1]
        assert re.match(r"\d\d:\d\d:\d\d \[rank0\] INFO ", shown), repr(seg)
        assert "%|" not in shown
    assert "step 4/6 (67 %" in out


@pytest.mark.slow  # a whole (tiny) stage in-process: DeepSpeed start-up dominates
def test_training_without_a_terminal_writes_plain_lines(train_world, capfd, caplog):
    import logging

    train = _train_entry()
    caplog.set_level(logging.INFO)
    args = train_world.args(1, "console", "train.max_steps=4", "train.log_every=2", "train.epochs=3")
    assert train.main(args) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "Loading weights" not in err  # no bar of ours or the libraries' in a log file
    assert err.startswith("train.py: stage 1 of run 'console' -> ")  # the first line, before the imports
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith("data epoch")]  # not once per epoch
    steps = [m for m in messages if m.startswith("step 2/4 (50 %") or m.startswith("step 4/4 (100 %")]
    assert len(steps) >= 2 and "ETA" in steps[0]
    first = [
        i for i, m in enumerate(messages) if m.startswith(("building the model", "starting the DeepSpeed"))
    ]
    assert len(first) == 2 and first[0] < first[1]  # what it is doing, before each slow part
