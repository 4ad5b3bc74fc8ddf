"""Hostile tool calls: nothing escapes the workspace, nothing crashes, every call gets a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from toollmm.agent.registry import Registry, tool
from toollmm.agent.sandbox import PathRefused, Workspace
from toollmm.agent.toolsets import SETS, declare_sets
from toollmm.core.react import react_action
from toollmm.core.toolcall import json_depth, parse_tool_call


# ---- user tools (module level, so the spawned child can import them) ---------------------------------
@tool(
    parameters={
        "type": "object",
        "properties": {"path": {"type": "string", "format": "path"}},
        "required": ["path"],
    }
)
def read_file(path: str) -> str:
    return Path(path).read_text()


@tool()
def sleep_forever(pid_file: str) -> str:
    Path(pid_file).write_text(json.dumps([os.getpid(), subprocess.Popen(["sleep", "300"]).pid]))
    while True:
        time.sleep(1)


@tool()
def crash(code: int) -> str:
    os._exit(code)


@tool()
def abort() -> str:
    os.abort()


@tool()
def raise_error() -> str:
    raise ValueError("bad input from the tool")


@tool()
def huge_output() -> str:
    return "x" * 5_000_000


@tool()
def noisy() -> str:
    print("NOISE from the tool")
    return "quiet result"


@tool(output="image")
def image_outside() -> str:
    return "/etc/hostname"


def _children() -> set[int]:
    """Live processes whose parent is this test process."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if int(ppid) == os.getpid() and state not in ("Z", "X"):
                out.add(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.fixture()
def reg(tmp_path):
    r = Registry(tmp_path / "ws", timeout_s=1.5, max_output_chars=1000, max_arg_chars=4096)
    declare_sets(r, SETS)
    for fn in (read_file, sleep_forever, crash, abort, raise_error, huge_output, image_outside, noisy):
        r.add(fn)
    return r


@pytest.mark.parametrize(
    "bad",
    [
        "../secret.txt",
        "image/../../secret.txt",
        "..\\..\\secret.txt",
        "./../secret.txt",
        "/etc/passwd",
        "C:\\Windows\\win.ini",
        "~/.ssh/id_rsa",
        "a\x00b",
        "x" * 5000,
        "",
        "link/secret.txt",
        "filelink",
    ],
)
def test_workspace_refuses_escapes(tmp_path, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    ws = Workspace(tmp_path / "ws")
    (ws.root / "link").symlink_to(outside, target_is_directory=True)
    (ws.root / "filelink").symlink_to(outside / "secret.txt")
    with pytest.raises(PathRefused):
        ws.resolve(bad)
    assert ws.resolve("image/ok.png") == ws.root / "image" / "ok.png"


def test_hostile_calls_each_get_a_clear_error(reg, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    (reg.workspace.root / "link").symlink_to(outside, target_is_directory=True)
    (reg.workspace.root / "inside.txt").write_text("hello")
    cases = [
        ("read_file", {"path": "../outside/secret.txt"}, "'..' is not allowed"),
        ("read_file", {"path": str(outside / "secret.txt")}, "absolute paths are not allowed"),
        ("read_file", {"path": "link/secret.txt"}, "outside the workspace"),
        ("read_file", {"path": 7}, "invalid arguments"),
        ("read_file", {}, "'path' is a required property"),
        ("read_file", ["inside.txt"], "must be a JSON object"),
        ("read_file", {"path": "inside.txt", "x": "y" * 10_000}, "arguments too large"),
        ("Edge Detection On Image", {"image_path": "a.png", "extra": 1}, "Additional properties"),
        ("Edge Detection On Image", {"image_path": "missing.png"}, "FileNotFoundError"),
        ("no such tool", {}, "unknown tool 'no such tool'"),
        ({"name": "x"}, {}, "unknown tool"),
        (None, None, "unknown tool"),
        ("crash", {"code": 3}, "crashed (exit code 3)"),
        ("abort", {}, "crashed (killed by signal 6)"),
        ("raise_error", {}, "ValueError: bad input from the tool"),
        ("image_outside", {}, "outside the workspace"),
    ]
    for name, args, expected in cases:
        r = reg.call(name, args)
        assert r.result is None and expected in r.error, (name, args, r.error)
        assert "secret" not in (r.error or "").replace("secret.txt", "")  # no file content leaks out
    assert reg.call("read_file", {"path": "inside.txt"}).result == "hello"
    big = reg.call("huge_output", {})
    assert big.ok and len(big.result) < 1100 and "[truncated: 4999000 more characters]" in big.result


def test_tool_that_sleeps_forever_is_killed_with_its_children(reg):
    reg.timeout_s = 4.0  # long enough for the tool process to start on a busy machine
    before = _children()
    t0 = time.perf_counter()
    r = reg.call("sleep_forever", {"pid_file": "pids.json"})
    assert "timed out after 4 s (tool process killed)" in r.error and time.perf_counter() - t0 < 15
    child, grandchild = json.loads((reg.workspace.root / "pids.json").read_text())  # cwd was the workspace
    deadline = time.time() + 5
    while (_alive(child) or _alive(grandchild)) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child) and not _alive(grandchild)
    assert _children() <= before


def test_thousands_of_hostile_calls_finish_fast_and_leave_nothing_behind(reg):
    hostile = [
        ("read_file", {"path": "../" * 50 + "etc/passwd"}),
        ("read_file", {"path": "/" + "a" * 100}),
        ("Edge Detection On Image", {"image_path": ["list"]}),
        ("Edge Detection On Image", {"image_path": "x" * 2000}),
        ("nope", {"a": 1}),
        ("read_file", "not a dict"),
        ("generate_image", {"prompt": ""}),
        ("Get Photo Description", {"image_path": "a.png"}),  # declared, no backend
    ]
    before, t0 = _children(), time.perf_counter()
    results = [reg.call(*hostile[i % len(hostile)]) for i in range(3000)]
    assert time.perf_counter() - t0 < 30
    assert all(r.error and r.result is None for r in results)
    assert _children() <= before


def test_call_parser_never_raises_on_model_text():
    deep = "[" * 200_000 + "]" * 200_000
    assert json_depth(deep) == 200_000
    texts = [
        deep,
        '{"name": "x", "arguments": ' + "{" * 50 + "}" * 50 + "}",
        '{"name": "x", "arguments": {"a": NaN}}',
        '{"name": "x", "arguments": {"a": Infinity}}',
        '{"name": "x", "arguments": "[1, 2"}',
        '{"name": 5}',
        "[1, 2, 3]",
        "",
        "{'name': 'x'}",
        '{"name": "x", "arguments": [1]}',
        "\udcff\x00",
        "x" * 100_000,
    ]
    for t in texts:
        call, err = parse_tool_call(t)
        assert err and call is None, t[:40]
    code, err = parse_tool_call("{\"name\": \"__import__('os').system('touch /tmp/pwned')\"}")
    assert err is None and code["arguments"] == {}  # just a (bad) name: looked up, never evaluated
    ok, err = parse_tool_call('{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}')
    assert err is None and ok == {"name": "f", "arguments": {"a": 1}}
    assert not Path("/tmp/pwned").exists()
    assert react_action("Action: X\nAction Input: a, b\nObservation:").tool_input == "a, b"
    assert react_action("Action:\nAction Input: a") is None and react_action("no action here") is None


def test_tool_prints_never_reach_stdout(reg, capfd):
    assert reg.call("noisy", {}).result == "quiet result"
    out, err = capfd.readouterr()
    assert "NOISE" not in out and "NOISE from the tool" in err  # a --json stdout stays clean


class _Payload:
    """Unpickling this runs code (writes the marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("ran",))


def test_the_tool_process_reads_json_only_never_unpickles(tmp_path):
    import pickle
    import sys

    from toollmm.agent.sandbox import _BOOT, function_ref, resolve_function_ref

    assert resolve_function_ref(function_ref(json_depth)) is json_depth
    with pytest.raises(TypeError):
        function_ref(lambda: None)
    marker = tmp_path / "ran.txt"
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT, str(write_fd)], stdin=subprocess.PIPE, pass_fds=(write_fd,)
    )
    os.close(write_fd)
    proc.communicate(pickle.dumps(_Payload(str(marker))), timeout=120)
    reply = json.loads(os.read(read_fd, 65536).split(b"\n")[0])
    os.close(read_fd)
    assert reply["status"] == "error" and "could not load the tool" in reply["payload"]
    assert not marker.exists()
