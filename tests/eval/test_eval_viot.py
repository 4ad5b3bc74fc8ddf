"""VIoT-Tool scoring against the shared first record of each test file (all three schemas,
tests/fixtures/samples/viot/), with predictions in VIoTGPT's own output form and documented faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toollmm.eval import ScoreOptions, score_files

FIX = Path(__file__).parents[1] / "fixtures" / "samples" / "viot"
NAMES = ("action", "anomaly", "crowd", "face", "fire", "gait", "licenceplate", "personreid", "vehiclereid")
FILES = [FIX / f"test_{n}.json" for n in NAMES]


def _query(name: str) -> str:
    text = (FIX / f"test_{name}.json").read_text(encoding="utf-8")
    rec = json.loads(text)[0] if text.lstrip().startswith("[") else json.loads(text.splitlines()[0])
    return rec.get("query") or rec["id"]


def _log(action: str, action_input: str) -> str:
    # one langchain AgentAction.log, as VIoTGPT's test scripts collect them
    return f"Thought: Do I need to use a tool? Yes.\nAction: {action}\nAction Input: {action_input}"


def _pred(name: str, *steps: tuple[str, str], **extra) -> dict:
    return {"id": _query(name), "chains": [_log(a, i) for a, i in steps], "result": "", **extra}


def _write(tmp_path: Path, preds: list[dict]) -> Path:
    p = tmp_path / "viot_out.jsonl"
    p.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in preds), encoding="utf-8")
    return p


PREDS = [
    # action: both steps right; the second uses the test file's alias spelling (normalised)
    _pred(
        "action",
        ("Detect the Human Pose", "video/Weifang.mp4"),
        ("Recognize the Action Condition on Pose", "results/HumanPose_Weifang.pkl"),
    ),
    # anomaly: right, with a space after the comma (pieces are compared stripped)
    _pred(
        "anomaly",
        ("Recognize the Scene in the Video", "video/Anomaly_Weifang.mp4"),
        ("Detect Anomaly Condition on Video Scene", "corridor, video/Anomaly_Weifang.mp4"),
    ),
    # crowd: right step (alias 'Crowd Counting') plus an extra step -> the chain fails
    _pred(
        "crowd",
        ("Crowd Counting", "video/Weifang.mp4"),
        ("Recognize the Scene in the Video", "video/Weifang.mp4"),
    ),
    # face: the upload as VIoTGPT names it (image/<8 hex>.png) stands for {query_upload_img_path}
    _pred("face", ("Recognize the Face", "image/1a2b3c4d.png,video/Zibo.mp4")),
    # fire: right tool, wrong video
    _pred("fire", ("Fire and Smoke Detection", "video/Hefei.mp4")),
    # gait: no prediction
    # licenceplate: 'Recognize the Vehicle Plate' with a plate -> plate recognition (right)
    _pred("licenceplate", ("Recognize the Vehicle Plate", "皖AX239T,video/Hefei.mp4")),
    # personreid: wrong tool
    _pred("personreid", ("Recognize the Face", "image/1a2b3c4d.png,video/Jinhua.mp4")),
    # vehiclereid: same alias, first argument the uploaded image itself -> vehicle re-identification (right)
    _pred("vehiclereid", ("Recognize the Vehicle Plate", "./new_query/0.jpg,video/Shaoxing.mp4")),
]


def test_step_and_chain_metrics(tmp_path):
    m = score_files("viot", FILES, [_write(tmp_path, PREDS)], ScoreOptions(allow_missing=True))["metrics"]
    # 10 reference steps with a prediction (action 2, anomaly 2, six others 1 each; gait has none), 8 chains
    # tool right:  action 2 + anomaly 2 + crowd 1 + face 1 + fire 1 + licence 1 + vehicle 1 = 9 / 10
    # input right: the same minus fire                                                  = 8 / 10
    # chains right: action, anomaly, face, licenceplate, vehiclereid                     = 5 / 8
    assert (m["steps"], m["n"], m["missing"]) == (10, 8, 1)
    assert m["step_action_acc"] == pytest.approx(9 / 10)
    assert m["step_action_input_acc"] == pytest.approx(8 / 10)
    assert m["chain_success"] == pytest.approx(5 / 8)
    by = m["by_tool"]
    assert by["Fire and Smoke Detection"] == {"step_action_acc": 1.0, "step_action_input_acc": 0.0, "n": 1}
    assert by["Recognize the Person by Appearance"]["step_action_acc"] == 0.0  # personreid: wrong tool
    assert "Recognize the Person by Gait" not in by  # its only record has no prediction: excluded
    assert by["Count People in the Video"]["step_action_input_acc"] == 1.0
    assert by["Recognize the Vehicle by Plate Number"]["step_action_input_acc"] == 1.0
    assert by["Recognize the Vehicle by Appearance"]["step_action_input_acc"] == 1.0
    assert sum(v["n"] for v in by.values()) == 10


def test_upload_placeholder_needs_the_upload(tmp_path):
    refs = [FIX / "test_face.json"]
    other = _pred("face", ("Recognize the Face", "image/photo.png,video/Zibo.mp4"))
    assert score_files("viot", refs, [_write(tmp_path, [other])])["metrics"]["step_action_input_acc"] == 0.0
    # the same path becomes right when the prediction declares it as the uploaded file (image_name_GT)
    declared = {**other, "image_name_GT": "image/photo.png"}
    assert score_files("viot", refs, [_write(tmp_path, [declared])])["metrics"]["chain_success"] == 1.0


def test_test_files_scored_against_themselves_and_error_chains(tmp_path):
    # the chain-string schema (A) read as predictions: every step right
    chain_files = [FIX / f"test_{n}.json" for n in ("action", "anomaly", "crowd", "fire", "licenceplate")]
    own = [json.loads(f.read_text(encoding="utf-8"))[0] for f in chain_files]
    m = score_files("viot", chain_files, [_write(tmp_path, own)])["metrics"]
    assert m["chain_success"] == 1.0 and m["steps"] == 7
    # VIoTGPT writes an error text instead of step logs when the agent failed to parse the model
    err = [{**own[0], "chains": "==========ValueError: Could not parse LLM output=========="}]
    m = score_files("viot", chain_files[:1], [_write(tmp_path, err)])["metrics"]
    assert m["step_action_acc"] == 0.0 and m["chain_success"] == 0.0


def test_batch_output_form(tmp_path):
    # --batch output keyed by our record id; the upload given as the record's own media path
    line = {
        "id": "test_face-0",
        "text": "",
        "tool_calls": [
            {"name": "Recognize the Face", "arguments": {"input": "./query/ID1_new/0.jpg,video/Zibo.mp4"}}
        ],
    }
    m = score_files("viot", [FIX / "test_face.json"], [_write(tmp_path, [line])])["metrics"]
    assert m["chain_success"] == 1.0


def test_tool_calls_compare_as_canonical_json():
    from toollmm.eval.toolcalls import calls_from_prediction, canonical_json, input_text, same_call

    # name first, argument keys sorted, no spaces, non-ASCII kept
    call = {"arguments": {"b": 1, "a": "皖AX239T"}, "name": "x"}
    assert canonical_json(call) == '{"name":"x","arguments":{"a":"皖AX239T","b":1}}'
    assert canonical_json({"type": "function", "function": call}) == canonical_json(call)
    assert same_call(call, {"name": "x", "arguments": {"a": "皖AX239T", "b": 1}})
    assert not same_call(call, {"name": "x", "arguments": {"a": "皖AX239T", "b": "1"}})
    # Action Input text of a call: raw ReAct input, or named arguments joined by commas
    assert input_text({"input": "a.png, text"}) == "a.png, text"
    assert input_text({"image_path": "a.png", "text": "a cat"}) == "a.png, a cat"
    # calls from raw model text with tool-call tokens (bad spans skipped)
    text = (
        'x<tool_call>{"name": "t", "arguments": {"input": "v.mp4"}}</tool_call> <tool_call>{bad</tool_call>'
    )
    assert calls_from_prediction({"text": text}) == [("t", "v.mp4")]
