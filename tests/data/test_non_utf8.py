"""Issue 16 item 3: bytes that are not UTF-8 never crash a reader with a bare ``UnicodeDecodeError``. Every
text reader (training JSONL through ``train.py``, ``load_jsonl``, the converters and ``prepare_data.py
convert``, sources, caption and batch files, config YAML) names the file and line (or record) and the
byte offset; under ``on_error=skip`` the line is counted under its own reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from entry_points import load_script
from toollmm.core.config import ConfigError
from toollmm.core.configlib import load_yaml
from toollmm.data.convert import ConversionError, convert_file
from toollmm.data.records import BadSample, RecordError, load_jsonl
from toollmm.data.sources import JsonlSource
from toollmm.infer.requests import BatchError, read_batch

BAD = b"\xff\xfe caf\xe9"  # latin-1 text in a UTF-8 file


def entry(name: str):
    return load_script(f"code/{name}.py", f"{name}_entry")


def with_bad_line(src: Path, dst: Path, at: int) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` with line ``at`` (1-based) given a non-UTF-8 byte; (line, byte offset)."""
    lines = src.read_bytes().splitlines(keepends=True)
    lines[at - 1] = lines[at - 1].replace(b'"content": "', b'"content": "' + BAD, 1)
    assert BAD in lines[at - 1]
    dst.write_bytes(b"".join(lines))
    offset = sum(len(x) for x in lines[: at - 1]) + lines[at - 1].index(BAD)
    return at, offset


def test_training_names_the_line_or_counts_it(train_world, tmp_path, capsys):
    """``train.py`` (stage 0 of the tiny world): raise -> one line naming file, line and byte offset, exit 2;
    skip -> the run trains and ``not_utf8`` is counted. ``has_media`` no longer reads text as UTF-8."""
    train = entry("train")
    head = tmp_path / "head.jsonl"  # six records, so one epoch reads the bad one whatever the order
    head.write_bytes(
        b"".join((train_world.demo / "train" / "lm_pretrain.jsonl").read_bytes().splitlines(True)[:6])
    )
    data = tmp_path / "lm.jsonl"
    line, offset = with_bad_line(head, data, 2)
    src = f'data.train=[{{path: "{data}"}}]'
    args = train_world.args(0, "utf8", src, "train.max_steps=null", "train.epochs=1", "data.heldout=[]")
    rc = train.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:{line}" in err and f"byte offset {offset}" in err and "not_utf8" in err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err
    assert train.main([*args, "data.on_error=skip", "run.name=utf8_skip"]) == 0
    ranks = json.loads((train_world.stage_dir("utf8_skip", 0) / "ranks.json").read_text())
    assert ranks[0]["skipped"] == {"not_utf8": 1} and ranks[0]["samples"] == 5


def test_jsonl_source_and_load_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    good = {"id": "a", "source": "s", "messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "ok"}]}  # fmt: skip
    text = json.dumps(good).encode() + b"\n"
    path.write_bytes(text + text.replace(b'"hi"', b'"h' + BAD + b'"').replace(b'"a"', b'"b"'))
    offset = len(text) + text.index(b'"hi"') + 2
    with pytest.raises(
        BadSample, match=rf"{path}:2: not_utf8: not UTF-8 text \(byte 0xff at byte offset {offset}\)"
    ):
        JsonlSource(path).load(1)
    with pytest.raises(RecordError, match=rf"{path}:2: .*byte offset {offset}"):
        list(load_jsonl(path))
    recs = load_jsonl(path, on_error="skip")
    assert [r["id"] for r in recs] == ["a"] and recs.skipped == {"not_utf8": 1}


def test_converters_jsonl_and_json_array(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    rec = {"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    line = json.dumps(rec).encode() + b"\n"
    jsonl.write_bytes(line + line.replace(b"hi", BAD))
    with pytest.raises(
        ConversionError, match=rf"{jsonl}:line 2 \(byte offset {len(line) + line.index(b'hi')}\): not UTF-8"
    ):
        convert_file("llava", jsonl, tmp_path / "o.jsonl")
    stats = convert_file("llava", jsonl, tmp_path / "o.jsonl", on_error="skip")
    assert stats.written == 1 and stats.skipped == {"not UTF-8 text": 1}
    assert "line 2 (byte offset" in stats.summary()

    array = tmp_path / "b.json"
    array.write_bytes(
        b"[" + json.dumps(rec).encode() + b",\n" + json.dumps(rec).encode().replace(b"ok", BAD) + b"]"
    )
    with pytest.raises(ConversionError, match=r"b\.json:record 1 \(conversations\[1\]\.value\): not UTF-8"):
        convert_file("llava", array, tmp_path / "o.jsonl")
    stats = convert_file("llava", array, tmp_path / "o.jsonl", on_error="skip")
    assert stats.written == 1 and stats.skipped == {"not UTF-8 text": 1}


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_prepare_data_convert_cli(tmp_path, capsys, mode):
    src = tmp_path / "in.json"
    rec = {"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    src.write_bytes(b"[" + json.dumps(rec).encode().replace(b"hi", BAD) + b"]")
    argv = ["convert", "--format", "llava", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]
    rc = entry("prepare_data").main(argv + (["--on-error", "skip"] if mode == "skip" else []))
    err = capsys.readouterr()
    if mode == "raise":
        assert rc == 2 and "in.json:record 0 (conversations[0].value): not UTF-8 text" in err.err
        assert "Traceback" not in err.err
    else:
        assert rc == 0 and "1 x not UTF-8 text" in err.out + err.err


def test_batch_caption_and_config_files(tmp_path):
    from toollmm.core.errors import NotUtf8, read_jsonl_objects

    batch = tmp_path / "in.jsonl"
    batch.write_bytes(b'{"prompt": "hi"}\n{"prompt": "' + BAD + b'"}\n')
    with pytest.raises(BatchError, match=rf"{batch}:2: not UTF-8 text \(byte 0xff at byte offset 29\)"):
        read_batch(batch)
    with pytest.raises(NotUtf8, match=rf"{batch}:2: .*byte offset 29"):
        read_jsonl_objects(batch)  # embed-captions' reader
    yml = tmp_path / "c.yaml"
    yml.write_bytes(b"run:\n  name: " + BAD + b"\n")
    with pytest.raises(ConfigError, match=rf"{yml}:2: not UTF-8 text \(byte 0xff at byte offset 13\)"):
        load_yaml(yml)


def test_stage_manifest_and_shard_index(tmp_path):
    from toollmm.checkpoint.stage import MANIFEST, StageError, read_manifest
    from toollmm.data.shards import ShardSource

    (tmp_path / MANIFEST).write_bytes(b'{"format": "' + BAD + b'"}')
    with pytest.raises(StageError, match=rf"{MANIFEST}:1: not UTF-8 text \(byte 0xff at byte offset 12\)"):
        read_manifest(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_bytes(b'{"shards": [\n"' + BAD + b'"]}')
    with pytest.raises(BadSample, match=r"index\.json:2: not UTF-8 text \(byte 0xff at byte offset 14\)"):
        ShardSource(shards)
