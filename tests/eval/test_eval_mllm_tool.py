"""MLLM-Tool scoring on the shared combined_data.json records (tests/fixtures/samples/mllm-tool/), with answers
written in every accepted form and documented faults. Expected values are counted by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toollmm.eval import ScoreOptions, score_files
from toollmm.eval.mllm_tool import parse_answer

REF = Path(__file__).parents[1] / "fixtures" / "samples" / "mllm-tool" / "combined_data.json"
RAW = json.loads(REF.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{'api_name': Intel/dpt-large}", "Intel/dpt-large"),  # MLLM-Tool's training target (unquoted)
        ("{'api_name': 'Intel/dpt-large'}", "Intel/dpt-large"),  # Python literal
        ('{"api_name": "Intel/dpt-large"}', "Intel/dpt-large"),  # JSON
        ("{api_name: Intel/dpt-large}###", "Intel/dpt-large"),  # stop marker left in
        ("  {'api_name': unknown}\n### Human: next", "unknown"),  # first line only; unknown is an id
        ("unknown", "unknown"),  # our records' plain no-tool answer
        ('<tool_call>{"name":"Intel/dpt-large","arguments":{}}</tool_call>', "Intel/dpt-large"),
        ("Intel/dpt-large", None),  # a bare id is not the format
        ("{'api_name': }", None),
        ("{'api_name': two words}", None),
        ("{'model': 'Intel/dpt-large'}", None),
        ('<tool_call>{"name": </tool_call>', None),
        (None, None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_model_text_is_never_evaluated(tmp_path):
    marker = tmp_path / "ran"
    text = "{'api_name': __import__('pathlib').Path('" + str(marker) + "').touch()}"
    parse_answer(text)
    assert not marker.exists()


def _anchor(i: int, response: str) -> dict:
    r = RAW[i]
    return {"question_id": r["id"], "questions": r["conversations"][0]["value"], "response": response}


def _write(tmp_path: Path, items: list[dict]) -> Path:
    p = tmp_path / "answers.jsonl"  # the anchor writes one JSON object per line
    p.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    return p


# records: 0 video-1 (amb -1), 1 video-11 (amb 2), 2 image-0 (amb -1), 3 image-4 (amb 1),
#          4 audio-1 (amb -1), 5 audio-81 (amb 2), 6 text-1 (amb "-1", a string); all onetomulti true
ANSWERS = [
    _anchor(0, "{'api_name': microsoft/xclip-base-patch32}"),  # acceptable -> right
    _anchor(1, "{'api_name': 'Intel/dpt-large'}"),  # parsable, known id, not acceptable here -> wrong
    _anchor(2, '{"api_name": "Intel/dpt-hybrid-midas"}'),  # right
    _anchor(3, "{'api_name': openai/made-up-model}"),  # invented id -> hallucination
    _anchor(4, "I think MIT/ast-finetuned-speech-commands-v2 fits"),  # unparsable -> format failure only
    _anchor(5, "{'api_name': unknown}"),  # 'unknown' is in no acceptable list here -> hallucination
    _anchor(6, ""),  # an empty answer: a format failure
]


def test_accuracy_hallucination_format_and_slices(tmp_path):
    m = score_files("mllm-tool", [REF], [_write(tmp_path, ANSWERS)])["metrics"]
    # right: 0, 2 -> 2/7; hallucinations: 3, 5 -> 2/7; parsable: 0, 1, 2, 3, 5 -> 5/7; n counts record 6
    assert m["n"] == 7 and m["missing"] == 0
    assert m["accuracy"] == pytest.approx(2 / 7)
    assert m["hallucination_rate"] == pytest.approx(2 / 7)
    assert m["format_accuracy"] == pytest.approx(5 / 7)
    mod = m["by_modality"]
    # video 0,1: 1/2 right, 0 halluc, 2/2 parsable; image 2,3: 1/2, 1/2, 2/2; audio 4,5: 0, 1/2, 1/2; text 6
    assert mod["video"] == pytest.approx(
        {"accuracy": 0.5, "hallucination_rate": 0, "format_accuracy": 1, "n": 2}
    )
    assert mod["image"] == pytest.approx(
        {"accuracy": 0.5, "hallucination_rate": 0.5, "format_accuracy": 1, "n": 2}
    )
    assert mod["audio"] == pytest.approx(
        {"accuracy": 0, "hallucination_rate": 0.5, "format_accuracy": 0.5, "n": 2}
    )
    assert mod["text"] == {"accuracy": 0.0, "hallucination_rate": 0.0, "format_accuracy": 0.0, "n": 1}
    amb = m["by_ambiguity"]
    # "-1" (int in 0, 2, 4; string "-1" in 6 -> one label): right 0, 2 -> 2/4; parsable 0, 2 -> 2/4
    assert amb["-1"] == pytest.approx(
        {"accuracy": 0.5, "hallucination_rate": 0, "format_accuracy": 0.5, "n": 4}
    )
    assert amb["1"] == pytest.approx({"accuracy": 0, "hallucination_rate": 1, "format_accuracy": 1, "n": 1})
    assert amb["2"] == pytest.approx({"accuracy": 0, "hallucination_rate": 0.5, "format_accuracy": 1, "n": 2})
    assert set(amb) == {"-1", "1", "2"}
    assert m["by_onetomulti"] == {
        "true": pytest.approx({k: m[k] for k in ("accuracy", "hallucination_rate", "format_accuracy", "n")})
    }


def test_compat_skips_the_unanswered_record(tmp_path):
    m = score_files("mllm-tool", [REF], [_write(tmp_path, ANSWERS[:6])], ScoreOptions(compat=True))["metrics"]
    assert m["n"] == 6 and m["missing"] == 1 and m["accuracy"] == pytest.approx(2 / 6)


def test_repeated_question_ids_are_told_apart_by_the_question(tmp_path):
    # question_id 1 is used by video, audio and text records; each answer must land on its own record
    answers = [_anchor(6, "{'api_name': nlptown/bert-base-multilingual-uncased-sentiment}")]
    answers += [_anchor(4, "{'api_name': superb/hubert-base-superb-ks}")]
    answers += [_anchor(0, "{'api_name': MCG-NJU/videomae-base-finetuned-kinetics}")]
    m = score_files("mllm-tool", [REF], [_write(tmp_path, answers)], ScoreOptions(allow_missing=True))
    m = m["metrics"]
    assert m["accuracy"] == pytest.approx(1.0) and (m["n"], m["missing"]) == (3, 4)
    assert {k: v["accuracy"] for k, v in m["by_modality"].items()} == pytest.approx(
        {"video": 1.0, "audio": 1.0, "text": 1.0}
    )


def test_batch_output_form(tmp_path):
    # the inference --batch JSONL, keyed by our record ids: a tool call, and the plain 'unknown' answer
    lines = [
        {"id": "image-4", "text": "", "tool_calls": [{"name": "vinvino02/glpn-kitti", "arguments": {}}]},
        {"id": "image-0", "text": "unknown", "tool_calls": []},
    ]
    p = tmp_path / "batch.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    m = score_files("mllm-tool", [REF], [p], ScoreOptions(allow_missing=True))["metrics"]
    # image-4 right; image-0 'unknown' parsable but not acceptable (and in no list -> hallucination)
    assert m["by_modality"]["image"] == pytest.approx(
        {"accuracy": 0.5, "hallucination_rate": 0.5, "format_accuracy": 1.0, "n": 2}
    )
