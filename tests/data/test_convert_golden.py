"""Every sample format converts to exactly the hand-written golden unified records.

Inputs: ``tests/fixtures/samples/`` (the real records of /work/shared/samples, unwrapped from their
``_provenance`` grouping into each upstream file's own shape) and ``tests/fixtures/upstream/`` (records
written from an upstream schema where no real sample exists; sources in data/README.md "Sources").
Goldens: ``tests/fixtures/golden/<format>/<file>.json``, written by hand from the source records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toollmm.data.convert import REGISTRY, convert_file

FIX = Path(__file__).parents[1] / "fixtures"
GOLDEN = FIX / "golden"
SHARED_SAMPLES = (
    Path(__file__).resolve().parents[1] / "fixtures" / "shared"
)  # verbatim copies of ../shared/samples

# (format, input under fixtures/, golden under fixtures/golden/, --opt options)
CASES = [
    ("llava", "samples/llava/llava_v1_5_mix665k.json", "llava/llava_v1_5_mix665k.json", {}),
    ("llava", "samples/llava/llava_instruct_150k.json", "llava/llava_instruct_150k.json", {}),
    ("llava", "samples/llava/blip_laion_cc_sbu_558k.json", "llava/blip_laion_cc_sbu_558k.json", {}),
    ("llava", "upstream/llava/llava_v1_5_mix665k_text.json", "llava/llava_v1_5_mix665k_text.json", {}),
    ("alpaca", "samples/alpaca/alpaca_data.json", "alpaca/alpaca_data.json", {}),
    (
        "videochat",
        "samples/videochat/llava_complex_reasoning_2k.json",
        "videochat/llava_complex_reasoning_2k.json",
        {},
    ),
    ("videochat", "samples/videochat/minigpt_caption_3k.json", "videochat/minigpt_caption_3k.json", {}),
    (
        "videochat",
        "upstream/videochat/videochat_instruct_11k.json",
        "videochat/videochat_instruct_11k.json",
        {},
    ),
    ("lavia", "samples/lavia/lavia_instruction.json", "lavia/lavia_instruction.json", {}),
    ("nextgpt-pairs", "samples/nextgpt-pairs/cc3m.json", "nextgpt-pairs/cc3m.json", {}),
    ("nextgpt-pairs", "samples/nextgpt-pairs/cc3m.json", "nextgpt-pairs/cc3m.t2x.json", {"direction": "t2x"}),
    ("nextgpt-pairs", "samples/nextgpt-pairs/audiocap.json", "nextgpt-pairs/audiocap.json", {}),
    ("nextgpt-pairs", "upstream/nextgpt-pairs/webvid.json", "nextgpt-pairs/webvid.json", {}),
    ("nextgpt-txt", "samples/nextgpt-txt/cc3m_comprehension.json", "nextgpt-txt/cc3m_comprehension.json", {}),
    ("nextgpt-txt", "samples/nextgpt-txt/cc3m_generation.json", "nextgpt-txt/cc3m_generation.json", {}),
    (
        "nextgpt-txt",
        "samples/nextgpt-txt/audiocap_comprehension.json",
        "nextgpt-txt/audiocap_comprehension.json",
        {},
    ),
    (
        "nextgpt-txt",
        "samples/nextgpt-txt/audiocap_generation.json",
        "nextgpt-txt/audiocap_generation.json",
        {},
    ),
    ("nextgpt-txt", "upstream/nextgpt-txt/instruction_data.json", "nextgpt-txt/instruction_data.json", {}),
    ("nextgpt-txt", "upstream/nextgpt-txt/audio_t2x.json", "nextgpt-txt/audio_t2x.json", {}),
    ("gpt4tools", "samples/gpt4tools/gpt4tools_71k.json", "gpt4tools/gpt4tools_71k.json", {}),
    ("gpt4tools", "samples/gpt4tools/gpt4tools_val_seen.json", "gpt4tools/gpt4tools_val_seen.json", {}),
    ("mllm-tool", "samples/mllm-tool/audio_tx2t.json", "mllm-tool/audio_tx2t.json", {}),
    ("mllm-tool", "samples/mllm-tool/audio_tx2t.json", "mllm-tool/audio_tx2t.merged.json", {"merge": "true"}),
    ("mllm-tool", "samples/mllm-tool/video_tx2t.json", "mllm-tool/video_tx2t.json", {}),
    ("mllm-tool", "samples/mllm-tool/combined_data.json", "mllm-tool/combined_data.json", {}),
    ("llamafactory", "upstream/llamafactory/mllm_demo.json", "llamafactory/mllm_demo.json", {}),
    ("llamafactory", "upstream/llamafactory/mllm_video_demo.json", "llamafactory/mllm_video_demo.json", {}),
    (
        "llamafactory",
        "upstream/llamafactory/glaive_toolcall_en_demo.json",
        "llamafactory/glaive_toolcall_en_demo.json",
        {},
    ),
    ("viot", "upstream/viot/viot_tool_train.json", "viot/viot_tool_train.json", {}),
] + [
    ("viot", f"samples/viot/test_{name}.json", f"viot/test_{name}.json", {})
    for name in (
        "action",
        "anomaly",
        "crowd",
        "fire",
        "licenceplate",
        "face",
        "personreid",
        "vehiclereid",
        "gait",
    )
]


def load_golden(rel: str) -> list[dict]:
    """A golden file with its shorthands expanded (``@viot_tools``, ``@gpt4tools_preamble``)."""
    records = json.loads((GOLDEN / rel).read_text(encoding="utf-8"))
    viot_tools = json.loads((GOLDEN / "viot" / "_viot_tools.json").read_text(encoding="utf-8"))
    preamble = (GOLDEN / "gpt4tools" / "_preamble.txt").read_text(encoding="utf-8")
    for rec in records:
        if rec.get("tools") == "@viot_tools":
            rec["tools"] = viot_tools
        for m in rec["messages"]:
            if m["content"] == "@gpt4tools_preamble":
                m["content"] = preamble
    return records


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_same_record(got: dict, want: dict, where: str) -> None:
    assert sorted(got) == sorted(want), f"{where}: fields {sorted(got)} != {sorted(want)}"
    for key in want:
        if key == "messages":
            assert len(got[key]) == len(want[key]), (
                f"{where}: {len(got[key])} messages, want {len(want[key])}"
            )
            for i, (g, w) in enumerate(zip(got[key], want[key])):
                assert sorted(g) == sorted(w), f"{where}: message {i} fields {sorted(g)} != {sorted(w)}"
                for field in w:
                    assert g[field] == w[field], f"{where}: message {i} {field}: {g[field]!r} != {w[field]!r}"
        else:
            assert got[key] == want[key], f"{where}: {key}: {got[key]!r} != {want[key]!r}"


@pytest.mark.parametrize("fmt,src,golden,opts", CASES, ids=[f"{c[0]}:{Path(c[2]).stem}" for c in CASES])
def test_converts_to_golden(fmt, src, golden, opts, tmp_path):
    out = tmp_path / "out.jsonl"
    stats = convert_file(fmt, FIX / src, out, options=opts)
    want = load_golden(golden)
    got = read_jsonl(out)
    assert stats.written == len(got) == len(want), (
        f"{golden}: wrote {len(got)} records, golden has {len(want)}"
    )
    assert not stats.skipped
    for k, (g, w) in enumerate(zip(got, want)):
        assert_same_record(g, w, f"{golden} record {k}")


def test_every_format_has_a_golden_case():
    assert {c[0] for c in CASES} | {"unified"} == set(REGISTRY)


def test_every_sample_and_upstream_fixture_is_covered():
    inputs = {c[1] for c in CASES}
    files = {
        str(p.relative_to(FIX))
        for d in ("samples", "upstream")
        for p in (FIX / d).rglob("*.json")
        if p.name != "dataset_info.json"
    }
    assert files == inputs


def _unwrap_shared() -> dict[str, object]:
    """The shared samples in each upstream file's shape, keyed by fixture path (mirrors samples/README)."""
    load = lambda name: json.loads((SHARED_SAMPLES / name).read_text(encoding="utf-8"))  # noqa: E731
    out: dict[str, object] = {
        "alpaca/alpaca_data.json": load("alpaca_format_samples_quoted.json")["records"],
        "gpt4tools/gpt4tools_71k.json": load("gpt4tools_format_train_samples_tyshiwo1_regenerated.json"),
        "gpt4tools/gpt4tools_val_seen.json": load("gpt4tools_val_seen_records_reconstructed.json"),
        "lavia/lavia_instruction.json": [load("lavia_video_instruction_sample_0_0.json")],
        "mllm-tool/audio_tx2t.json": load("mllmtool_audio_tx2t_train_sample.json"),
        "mllm-tool/video_tx2t.json": load("mllmtool_video_tx2t_train_sample.json"),
        "mllm-tool/combined_data.json": load("mllmtool_combined_data_test_sample.json"),
    }
    llava = load("llava_format_samples_quoted.json")
    out["llava/llava_v1_5_mix665k.json"] = llava["llava_v1_5_mix665k_like"]
    out["llava/llava_instruct_150k.json"] = llava["llava_instruct_150k_like"]
    out["llava/blip_laion_cc_sbu_558k.json"] = llava["blip_laion_cc_sbu_558k_pretrain"]
    for key, recs in load("nextgpt_tx_pair_samples.json").items():
        if not key.startswith("_"):
            name = Path(key).name
            out[f"{'nextgpt-pairs' if name in ('cc3m.json', 'audiocap.json') else 'nextgpt-txt'}/{name}"] = (
                recs
            )
    for group, fmt in (
        ("videochat_it_schema_samples.json", "videochat"),
        ("viotgpt_test_samples.json", "viot"),
    ):
        for key, recs in load(group).items():
            if not key.startswith("_"):
                out[f"{fmt}/{Path(key).name}"] = recs
    return out


@pytest.mark.skipif(not SHARED_SAMPLES.is_dir(), reason="shared samples folder not present")
def test_fixtures_are_the_shared_samples_unwrapped():
    from toollmm.data.convert import iter_source

    expected = _unwrap_shared()
    assert set(expected) == {str(p.relative_to(FIX / "samples")) for p in (FIX / "samples").rglob("*.json")}
    for rel, records in expected.items():
        got = [raw for _, raw in iter_source(FIX / "samples" / rel)]
        assert got == records, rel
