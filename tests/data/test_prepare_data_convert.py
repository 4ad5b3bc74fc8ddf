"""``prepare_data.py convert``: summary counts, bad input named or counted, media checks, throughput."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from entry_points import load_script
from toollmm.data.convert import ConversionError, convert_file

FIX = Path(__file__).parents[1] / "fixtures"


def _load_entry():
    return load_script("code/prepare_data.py", "prepare_data")


prepare_data = _load_entry()


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _llava(i: int, image: str | None = "a.jpg") -> dict:
    rec = {
        "id": f"r{i}",
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
    }
    if image:
        rec["image"] = image
    return rec


def test_cli_prints_summary_counts(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    code = prepare_data.main(
        [
            "convert",
            "--format",
            "mllm-tool",
            "--input",
            str(FIX / "samples/mllm-tool/video_tx2t.json"),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "records read 4, written 4, skipped 0" in text
    assert "records/s" in text
    assert len(out.read_text().splitlines()) == 4


def test_cli_opt_reaches_the_converter(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    args = ["convert", "--format", "mllm-tool", "--input", str(FIX / "samples/mllm-tool/video_tx2t.json")]
    assert prepare_data.main([*args, "--output", str(out), "--opt", "merge=true"]) == 0
    assert "records read 4, written 3" in capsys.readouterr().out
    assert prepare_data.main([*args, "--output", str(out), "--opt", "bogus=1"]) == 2
    assert "no option(s) ['bogus']" in capsys.readouterr().err


def test_malformed_jsonl_line_is_named_or_counted(tmp_path, capsys):
    src = _write_jsonl(
        tmp_path / "in.jsonl",
        [json.dumps(_llava(0)), '{"id": "r1", "conversations": [', json.dumps(_llava(2))],
    )
    out = tmp_path / "o.jsonl"
    argv = ["convert", "--format", "llava", "--input", str(src), "--output", str(out)]
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{src}:line 2: malformed JSON line" in err
    assert not out.exists()
    assert prepare_data.main([*argv, "--on-error", "skip"]) == 0
    text = capsys.readouterr().out
    assert "records read 3, written 2, skipped 1" in text
    assert "1 x malformed JSON line" in text and f"{src}:line 2" in text
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r0", "r2"]


def test_malformed_json_array_names_file_and_position(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text('[{"id": 1,\n "conversations": ]', encoding="utf-8")
    with pytest.raises(ConversionError, match=r"bad.json: malformed JSON \(.* at line 2 column"):
        convert_file("llava", src, tmp_path / "o.jsonl", on_error="skip")


def test_missing_field_names_record_and_key(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([_llava(0), {"id": "x", "image": "b.jpg"}]), encoding="utf-8")
    with pytest.raises(ConversionError, match=r"in.json:record 1: missing key 'conversations'"):
        convert_file("llava", src, tmp_path / "o.jsonl")
    stats = convert_file("llava", src, tmp_path / "o.jsonl", on_error="skip")
    assert (stats.read, stats.written, sum(stats.skipped.values())) == (2, 1, 1)
    assert stats.examples[next(iter(stats.skipped))].endswith("in.json:record 1")


@pytest.mark.parametrize(
    "fmt,record,message",
    [
        (
            "llava",
            {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image><image>q"}]},
            "2 <image> placeholder(s) for 1 image",
        ),
        ("llava", {"id": "a", "conversations": [{"from": "robot", "value": "q"}]}, "unknown speaker 'robot'"),
        ("alpaca", {"instruction": 3, "output": "o"}, "key 'instruction': expected str, got int"),
        ("videochat", {"video": "v.mp4", "QA": "not a list"}, "key 'QA': expected list, got str"),
        ("videochat", {"QA": []}, "neither 'video' nor 'image'"),
        (
            "lavia",
            {
                "id": "l",
                "image": ["f0.png", "f1.png"],
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
            },
            "1 <image> placeholder(s) for 2 frame(s)",
        ),
        ("nextgpt-pairs", {"caption": "c"}, "exactly one of image_name / video_name / audio_name"),
        (
            "nextgpt-txt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "ok <image>"}]},
            "generated image #0 has no caption",
        ),
        (
            "gpt4tools",
            {"instruction": "just a question", "input": "", "output": "x"},
            "does not follow the GPT4Tools prompt template",
        ),
        ("viot", {"id": "q", "chains": "Action: X\n", "result": ""}, "chains: not ReAct text"),
        (
            "viot",
            {"conversations": [{"from": "AI_reject", "value": "x"}]},
            "DPO 'AI_reject' is not supported",
        ),
        (
            "mllm-tool",
            {
                "id": 1,
                "input_modality": "audio",
                "audio_path": "",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "m/x"}],
            },
            "audio_path is empty",
        ),
        (
            "llamafactory",
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "function_call", "value": "not json"},
                ]
            },
            "function_call value is not JSON",
        ),
    ],
)
def test_bad_records_raise_naming_the_record(tmp_path, fmt, record, message):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([record]), encoding="utf-8")
    with pytest.raises(ConversionError) as err:
        convert_file(fmt, src, tmp_path / "o.jsonl")
    assert str(err.value).startswith(f"{src}:record 0: ")
    assert message in str(err.value)


def test_schema_invalid_unified_records_are_counted(tmp_path):
    good = {
        "id": "a",
        "source": "s",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    bad = {"id": "b", "messages": [{"role": "robot", "content": "hi"}]}
    src = _write_jsonl(tmp_path / "in.jsonl", [json.dumps(good), json.dumps(bad)])
    with pytest.raises(ConversionError, match="line 2: converted record is invalid"):
        convert_file("unified", src, tmp_path / "o.jsonl")
    stats = convert_file("unified", src, tmp_path / "o.jsonl", on_error="skip")
    assert stats.written == 1 and all(r.startswith("schema: ") for r in stats.skipped)


def test_duplicate_ids_are_renamed_and_counted(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([_llava(0), _llava(0), _llava(0)]), encoding="utf-8")
    stats = convert_file("llava", src, tmp_path / "o.jsonl")
    ids = [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert ids == ["r0", "r0#2", "r0#3"] and stats.renamed_ids == 2


def test_media_root_checks_that_files_exist(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.jpg").write_bytes(b"x")
    src = tmp_path / "in.json"
    src.write_text(json.dumps([_llava(0, "a.jpg"), _llava(1, "missing.jpg")]), encoding="utf-8")
    with pytest.raises(ConversionError, match=r"record 1: missing media file 'missing.jpg'"):
        convert_file("llava", src, tmp_path / "o.jsonl", media_root=tmp_path / "media")
    stats = convert_file("llava", src, tmp_path / "o.jsonl", media_root=tmp_path / "media", on_error="skip")
    assert stats.written == 1
    assert convert_file("llava", src, tmp_path / "o.jsonl").written == 2  # no root: paths are not checked


def test_unknown_format_and_missing_input(tmp_path):
    with pytest.raises(ConversionError, match="unknown format 'nope'"):
        convert_file("nope", FIX / "samples/alpaca/alpaca_data.json", tmp_path / "o.jsonl")
    with pytest.raises(ConversionError, match="input file not found"):
        convert_file("alpaca", tmp_path / "absent.json", tmp_path / "o.jsonl")


def test_unified_output_converts_again_unchanged(tmp_path):
    first = tmp_path / "a.jsonl"
    convert_file("gpt4tools", FIX / "samples/gpt4tools/gpt4tools_val_seen.json", first)
    second = tmp_path / "b.jsonl"
    stats = convert_file("unified", first, second)
    assert stats.written == 2 and first.read_text() == second.read_text()


def test_formats_subcommand_lists_every_format(capsys):
    from toollmm.data.convert import FORMATS

    assert prepare_data.main(["formats"]) == 0
    text = capsys.readouterr().out
    assert all(f in text for f in FORMATS) and "--opt direction=" in text


THROUGHPUT_SOURCES = [
    ("llava", "samples/llava/llava_v1_5_mix665k.json"),
    ("gpt4tools", "samples/gpt4tools/gpt4tools_val_seen.json"),
    ("viot", "samples/viot/test_action.json"),
    ("mllm-tool", "samples/mllm-tool/combined_data.json"),
    ("nextgpt-txt", "samples/nextgpt-txt/cc3m_generation.json"),
]


@pytest.mark.parametrize("fmt,rel", THROUGHPUT_SOURCES)
def test_throughput_on_replicated_samples(fmt, rel, tmp_path, capsys):
    """A few thousand records replicated from the samples; prints records/s (validation included)."""
    records = json.loads((FIX / rel).read_text(encoding="utf-8"))
    n = 2000
    src = tmp_path / "big.json"
    src.write_text(json.dumps([records[i % len(records)] for i in range(n)]), encoding="utf-8")
    t0 = time.perf_counter()
    stats = convert_file(fmt, src, tmp_path / "o.jsonl")
    dt = time.perf_counter() - t0
    assert stats.written == n and stats.renamed_ids == (
        n - len(records) if fmt != "viot" and fmt != "nextgpt-txt" else 0
    )
    with capsys.disabled():
        convert_only = n / max(dt - stats.validate_seconds, 1e-9)
        print(
            f"\nthroughput {fmt}: {n / dt:,.0f} records/s with validation, {convert_only:,.0f} without ({n} records)"
        )
    assert n / dt > 50


def test_fast_validator_agrees_with_the_plain_schema(tmp_path):
    from jsonschema import Draft202012Validator

    from toollmm.core.paths import DATA_DIR
    from toollmm.data.records import _schema_problems

    plain = Draft202012Validator(json.loads((DATA_DIR / "schema.json").read_text()))
    convert_file("viot", FIX / "samples/viot/test_gait.json", tmp_path / "o.jsonl")
    good = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    mutations = [
        lambda r: r,
        lambda r: r.update(videos=[""]),
        lambda r: r.update(videos=[[]]),
        lambda r: r["tools"][3]["function"].update(extra=1),
        lambda r: r["tools"].append({"type": "function"}),
        lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="x"),
        lambda r: r["messages"][1].update(generate=[{"modality": "smell"}]),
        lambda r: r["messages"][1].update(generate=[{"modality": "image", "media": ""}]),
        lambda r: r.update(extra=True),
        lambda r: r["eval"].update(ambiguity=1.5),
        lambda r: r.pop("source"),
    ]
    for k, mutate in enumerate(mutations):
        rec = json.loads(json.dumps(good))
        mutate(rec)
        assert plain.is_valid(rec) == (k == 0), f"mutation {k}"
        assert (not _schema_problems(rec)) == (k == 0), f"mutation {k}"
