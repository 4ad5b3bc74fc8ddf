"""Issue 16 item 8: user errors are one line naming the file and record, exit 2, in every CLI; ``--verbose``
adds the traceback. A bug still shows its traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from entry_points import load_script
from toollmm.checkpoint.stage import MANIFEST, file_hashes


def entry(name: str):
    return load_script(f"code/{name}.py", f"{name}_entry_ue")


def one_line_error(err: str, *needles: str) -> None:
    """No traceback; the error names what it must (log lines before it are allowed)."""
    assert err.strip() and "Traceback" not in err, err
    assert all(n in err for n in needles), err


class Payload:
    """Unpickling this runs code (``__reduce__``); refusing it must name the file."""

    def __reduce__(self):
        return (Path.touch, (Path("/tmp/toollmm_payload_ran"),))


def tampered(tiny_stage_dir, tmp_path) -> Path:
    """A copy of the tiny stage folder (the manifest is rewritten after each edit, as an attacker would)."""
    d = tmp_path / "stage"
    shutil.copytree(tiny_stage_dir, d, symlinks=True)
    return d


def reseal(d: Path) -> None:
    m = json.loads((d / MANIFEST).read_text())
    m["files"] = file_hashes(d)
    (d / MANIFEST).write_text(json.dumps(m))


def infer(capsys, d, *extra):
    rc = entry("inference").main(
        ["--checkpoint", str(d), "--prompt", "hi", "--output-dir", str(d.parent / "o"), *extra]
    )
    return rc, capsys.readouterr().err


def test_truncated_delta_with_a_matching_manifest(tiny_stage_dir, tmp_path, capsys):
    d = tampered(tiny_stage_dir, tmp_path)
    f = d / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    reseal(d)
    rc, err = infer(capsys, d)
    assert rc == 2
    one_line_error(err, str(f))
    assert "SafetensorError" not in err.splitlines()[0] or str(f) in err.splitlines()[0]
    rc, err = infer(capsys, d, "--verbose")
    assert rc == 2 and "Traceback" in err and str(f) in err


def test_malicious_adapter_bin_is_refused_naming_it(tiny_stage_dir, tmp_path, capsys):
    d = tampered(tiny_stage_dir, tmp_path)
    adapter = d / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    import torch

    torch.save({"x": Payload()}, adapter / "adapter_model.bin")
    reseal(d)
    Path("/tmp/toollmm_payload_ran").unlink(missing_ok=True)
    rc, err = infer(capsys, d)
    assert rc == 2 and not Path("/tmp/toollmm_payload_ran").exists()
    one_line_error(err, str(adapter))


def test_malicious_llm_bin_is_refused_naming_it(tiny_stage_dir, tmp_path):
    """The base LLM folder holds a ``pytorch_model.bin`` with a payload: a user error naming the folder
    (transformers refuses the pickle; nothing runs)."""
    from toollmm.checkpoint.stage import stage_config
    from toollmm.core.errors import UserError
    from toollmm.model.llm import load_causal_lm

    cfg = stage_config(tiny_stage_dir).model.llm
    fake = tmp_path / "llm"
    shutil.copytree(cfg.path, fake)
    for f in fake.glob("*.safetensors"):
        f.unlink()
    import torch

    torch.save({"x": Payload()}, fake / "pytorch_model.bin")
    Path("/tmp/toollmm_payload_ran").unlink(missing_ok=True)
    cfg.path, cfg.tokenizer = str(fake), None
    with pytest.raises(UserError, match="model.llm.path") as err:
        load_causal_lm(cfg)
    assert str(fake) in str(err.value)
    assert not Path("/tmp/toollmm_payload_ran").exists()


def test_failed_upload_names_the_repo_and_folder(tmp_path, monkeypatch):
    """A real ``HfApi`` against a port where nothing listens: httpx's ConnectError becomes a
    ``ReleaseError`` (a user error: release.py prints one line, exit 2)."""
    from huggingface_hub import HfApi, constants

    from toollmm.core.errors import UserError, user_message

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this one needs a socket
    from toollmm.release.folder import ReleaseError
    from toollmm.release.upload import upload

    folder = tmp_path / "rel"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"toollmm_version": "0", "stage": 3}))
    api = HfApi(endpoint="http://127.0.0.1:9", token="hf_not_a_token")
    with pytest.raises(ReleaseError) as err:
        upload(folder, "someone/toollmm-test", api=api)
    msg = user_message(err.value)
    assert isinstance(err.value, UserError) and "someone/toollmm-test" in msg and str(folder) in msg
    assert "ConnectError" in msg or "Connect" in msg


def test_deep_arguments_to_a_tool_are_a_clear_error_not_an_internal_one(tmp_path):
    """10^5-deep arguments handed to ``Registry.call`` (the inference config's real registry)."""
    from toollmm.agent.toolsets import registry_from_config
    from toollmm.core.config import load_config

    reg = registry_from_config(load_config().config.inference, workspace=tmp_path)
    deep: dict = {}
    cur = deep
    for _ in range(100_000):
        cur["a"] = {}
        cur = cur["a"]
    for name in ("Edge Detection On Image", "no such tool"):
        res = reg.call(name, deep)
        assert res.error and "internal error" not in res.error, res.error
    assert "nested too deeply" in reg.call("Edge Detection On Image", deep).error


def test_malformed_batch_lists_every_bad_line_up_to_20(tiny_stage_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    lines = ['{"prompt": "fine"}'] + ["{not json"] * 25 + ['{"prompt": "x", "image": "a.png"}']
    src.write_text("\n".join(lines) + "\n")
    rc = entry("inference").main(
        ["--checkpoint", str(tiny_stage_dir), "--batch", str(src), "--out", str(tmp_path / "o.jsonl")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "26 bad line(s)" in err and "(and 6 more)" in err
    assert all(f"{src}:{n}: not valid JSON" in err for n in range(2, 22))
    assert f"{src}:22:" not in err


def test_every_cli_turns_a_user_error_into_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.json")
    cases = {
        "prepare_data": [
            "convert",
            "--format",
            "llava",
            "--input",
            missing,
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        "evaluate": ["score", "--benchmark", "mllm-tool", "--references", missing, "--predictions", missing],
        "release": ["--checkpoint", str(tmp_path), "--repo-id", "a/b", "--dry-run"],
        "train": ["--stage", "1", "--config", missing],
        "app": ["--checkpoint", str(tmp_path)],
        "inference": ["--checkpoint", str(tmp_path), "--prompt", "hi"],
    }
    for name, argv in cases.items():
        rc = entry(name).main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        one_line_error(err, str(tmp_path))
        rc = entry(name).main([*argv, "--verbose"])
        err = capsys.readouterr().err
        assert rc == 2 and str(tmp_path) in err and "Traceback" in err, (name, err)


def test_a_bug_keeps_its_traceback():
    from toollmm.core.errors import cli_errors

    @cli_errors("x.py")
    def main(argv=None):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main([])
