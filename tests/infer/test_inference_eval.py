"""``evaluate.py run`` through ``toollmm.load`` (its real ``load_generator``) on a tiny stage folder and a
3-record VIoT test file: predictions written per record, metrics computed, the first tool call of each
step reported without being run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import toollmm
from entry_points import load_script
from inference_fixtures import call_text, steer
from toollmm.infer.requests import Request

FIX = Path(__file__).parents[1] / "fixtures" / "samples" / "viot"


def _entry():
    return load_script("code/evaluate.py", "evaluate_entry")


evaluate = _entry()


@pytest.fixture
def three(tmp_path) -> Path:
    recs = [
        json.loads((FIX / f"test_{n}.json").read_text(encoding="utf-8"))[0]
        for n in ("action", "anomaly", "crowd")
    ]
    p = tmp_path / "test_three.json"
    p.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return p


def test_run_loads_the_checkpoint_and_scores(tiny_stage_dir, three, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["run", "--benchmark", "viot", "--checkpoint", str(tiny_stage_dir), "--data", str(three),
            "--output", str(out), "--json"]  # fmt: skip
    assert evaluate.main(argv) == 0
    result = json.loads((out / "viot.json").read_text(encoding="utf-8"))
    assert result["metrics"]["n"] == 3 and json.loads(capsys.readouterr().out)["metrics"] == result["metrics"]
    preds = [json.loads(x) for x in (out / "viot.predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["id"] for p in preds] == ["test_three-0", "test_three-1", "test_three-2"]
    # the runtime's output folder sits with the results (out/media), made only when a file is written
    assert not (out / "media").exists()


def test_steered_model_calls_are_scored_not_run(tiny_stage_dir, three, tmp_path):
    ran = []

    def factory(checkpoint, benchmark):
        rt = steer(
            toollmm.load(
                checkpoint, output_dir=tmp_path / "media", overrides=["inference.tool_sets=[viotgpt]"]
            ),
            [("action being carried", call_text("Detect the Human Pose", '{"input": "video/Weifang.mp4"}'))],
        )
        rt.registry.set_backend("Detect the Human Pose", lambda **kw: ran.append(kw) or "pose.pkl")
        return rt.eval_generator(benchmark)

    out = tmp_path / "eval"
    argv = [
        "run",
        "--benchmark",
        "viot",
        "--checkpoint",
        str(tiny_stage_dir),
        "--data",
        str(three),
        "--output",
        str(out),
    ]
    assert evaluate.main(argv, generator_factory=factory) == 0
    preds = [json.loads(x) for x in (out / "viot.predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    # step 0 of the action record: the right tool and input (its reference observation is fed back)
    assert preds[0]["tool_calls"][0]["name"] == "Detect the Human Pose"
    assert preds[0]["tool_calls"][0]["arguments"] == {"input": "video/Weifang.mp4"}
    assert ran == []  # teacher-forced: calls are read, never executed
    metrics = json.loads((out / "viot.json").read_text(encoding="utf-8"))["metrics"]
    assert metrics["step_action_acc"] > 0


def test_generator_stops_at_the_v0_turn_end(tiny_stage_dir, tmp_path):
    """``evaluate.py run``'s generator (the runtime) honours the template's stop string: a vicuna_v0 model
    that writes ``###`` and runs on into an invented ``Human:`` turn is cut at the ``###``."""
    rt = steer(
        toollmm.load(
            tiny_stage_dir, output_dir=tmp_path / "media", overrides=["model.chat_template=vicuna_v0"]
        ),
        [("weather?", "Rainy.\n### Human: more")],
    )
    prompt = {"id": "r0", "step": 0, "messages": [{"role": "user", "content": "weather?"}]}
    [out] = rt.eval_generator("viot")([{**prompt, "stop_at_tool_call": True}])
    assert out["text"].strip() == "Rainy." and out["errors"] == []
    [row] = rt.generate([Request(prompt["messages"])])
    assert row.finish_reason == "stop_string" and "more" not in row.raw_text
