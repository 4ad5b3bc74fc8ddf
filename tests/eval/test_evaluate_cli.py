"""``evaluate.py`` in-process: ``run`` with a scripted generator on a 3-record file (teacher forcing, files
written, re-scored by ``score``), the output forms, and bad input named clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from entry_points import load_script
from toollmm.eval import EvalError, run_benchmark
from toollmm.eval.common import load_references
from toollmm.eval.run import generate_predictions, read_step, split_reference

FIX = Path(__file__).parents[1] / "fixtures" / "samples"


def _load_entry():
    return load_script("code/evaluate.py", "evaluate")


evaluate = _load_entry()


@pytest.fixture
def three(tmp_path) -> Path:
    """A 3-record VIoT test file: action (2 steps), anomaly (2 steps), crowd (1 step)."""
    recs = [
        json.loads((FIX / "viot" / f"test_{n}.json").read_text(encoding="utf-8"))[0]
        for n in ("action", "anomaly", "crowd")
    ]
    p = tmp_path / "test_three.json"
    p.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return p


def _call(name: str, raw: str) -> dict:
    return {"text": "", "tool_calls": [{"name": name, "arguments": {"input": raw}, "result": None}]}


class Scripted:
    """Answers by (record id, step); remembers every prompt it was given."""

    def __init__(self):
        self.prompts: list[dict] = []
        self.calls = 0
        self.script = {
            ("test_three-0", 0): _call("Detect the Human Pose", "video/Weifang.mp4"),
            # ReAct text with the test file's alias spelling
            ("test_three-0", 1): {
                "text": "Thought: Do I need to use a tool? Yes.\nAction: Recognize the Action Condition on Pose\n"
                "Action Input: results/HumanPose_Weifang.pkl\nObservation:"
            },
            ("test_three-1", 0): _call("Recognize the Scene in the Video", "video/Anomaly_Weifang.mp4"),
            ("test_three-1", 1): _call("Fire and Smoke Detection", "video/Anomaly_Weifang.mp4"),  # wrong tool
            ("test_three-1", 2): _call(
                "Count People in the Video", "video/Anomaly_Weifang.mp4"
            ),  # extra call
            ("test_three-2", 0): {"text": "There are about 20 people."},  # answers without the tool
        }

    def __call__(self, prompts: list[dict]) -> list[dict]:
        self.calls += 1
        self.prompts += prompts
        return [self.script[(p["id"], p["step"])] for p in prompts]


def test_teacher_forced_prompts_feed_back_reference_steps(three):
    gen = Scripted()
    refs = load_references("viot", [three])
    preds = generate_predictions(refs, gen, batch_size=2)
    # prompts: step 0 for all 3; step 1 for action and anomaly (their step-0 calls have reference
    # observations); no step 2: the test files end with a call still waiting for its observation
    # (``Observation: \n``), so there is nothing to feed back; crowd stopped at its answer
    assert [(p["id"], p["step"]) for p in gen.prompts] == [
        ("test_three-0", 0), ("test_three-1", 0), ("test_three-2", 0), ("test_three-0", 1), ("test_three-1", 1),
    ]  # fmt: skip
    assert gen.calls == 3  # batches of 2: 3 prompts -> 2 calls, then 1
    context, gt = split_reference(refs[1].record)
    step1 = next(p for p in gen.prompts if p["id"] == "test_three-1" and p["step"] == 1)
    assert all(p["stop_at_tool_call"] for p in gen.prompts)
    # the step-1 prompt is the context plus the REFERENCE call 0 and its observation ('corridor')
    assert step1["messages"] == context + [gt[0][0], gt[0][1]] and gt[0][1]["content"] == "corridor"
    assert step1["tools"] == refs[1].record["tools"]
    # assembled predictions: calls with the reference observations, the final answer, the ReAct chain
    assert [c["name"] for c in preds[1]["tool_calls"]] == [
        "Recognize the Scene in the Video", "Fire and Smoke Detection"
    ]  # fmt: skip
    assert preds[1]["tool_calls"][0]["result"] == "corridor" and preds[1]["tool_calls"][1]["result"] is None
    assert preds[2] == {
        "id": "test_three-2",
        "text": "There are about 20 people.",
        "tool_calls": [],
        "react": ("Thought: Do I need to use a tool? No\nAI: There are about 20 people.\n"),
    }
    assert "Observation: corridor\n" in preds[1]["react"]


def test_run_writes_results_and_score_reproduces_them(three, tmp_path, capsys):
    ckpt = tmp_path / "stage_3"
    ckpt.mkdir()
    rc = evaluate.main(
        ["run", "--benchmark", "viot", "--checkpoint", str(ckpt), "--data", str(three), "--json"],
        generator_factory=lambda checkpoint, benchmark: Scripted(),
    )
    assert rc == 0
    result = json.loads((ckpt / "eval" / "viot.json").read_text(encoding="utf-8"))
    m = result["metrics"]
    # 5 reference steps: action 2/2 right; anomaly step 0 right, step 1 wrong tool; crowd step 0 missing
    # -> tools 3/5, inputs 3/5; chains: only action -> 1/3
    assert m["step_action_acc"] == pytest.approx(3 / 5) and m["step_action_input_acc"] == pytest.approx(3 / 5)
    assert m["chain_success"] == pytest.approx(1 / 3) and m["n"] == 3
    assert json.loads(capsys.readouterr().out)["metrics"] == m
    preds = ckpt / "eval" / "viot.predictions.jsonl"
    assert len(preds.read_text(encoding="utf-8").splitlines()) == 3
    rc = evaluate.main(
        ["score", "--benchmark", "viot", "--references", str(three), "--predictions", str(preds), "--json"]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["metrics"] == m


def test_run_limit_and_mllm_tool_single_step(tmp_path):
    ref = FIX / "mllm-tool" / "combined_data.json"

    def gen(prompts):
        assert all(len(p["messages"]) == 1 and p["messages"][0]["role"] == "user" for p in prompts)
        answers = {
            "video-1": {"text": "unknown"},  # our plain no-tool answer
            "video-11": {"text": "{'api_name': Intel/dpt-large}"},  # MLLM-Tool's own form, wrong tool
        }
        return [answers[p["id"]] for p in prompts]

    r = run_benchmark("mllm-tool", [ref], gen, out_dir=tmp_path / "eval", limit=2)
    m = r["metrics"]
    # 2 records, none right, both parsable. 'unknown' is in no acceptable list of the file -> hallucination;
    # Intel/dpt-large is acceptable for the IMAGE records beyond --limit -> known id, not a hallucination
    assert m["n"] == 2 and m["accuracy"] == 0.0 and m["format_accuracy"] == 1.0
    assert m["hallucination_rate"] == 0.5
    assert (tmp_path / "eval" / "mllm-tool.json").is_file()


def test_free_mode_takes_the_generator_output_as_is():
    ref = FIX / "viot" / "test_fire.json"
    seen = []

    def gen(prompts):
        seen.extend(prompts)
        return [_call("Fire and Smoke Detection", "video/Weifang.mp4") | {"text": "no fire", "id": "other"}]

    r = run_benchmark("viot", [ref], gen, mode="free")
    assert [(p["step"], p["stop_at_tool_call"]) for p in seen] == [(0, False)]
    assert r["metrics"]["chain_success"] == 1.0


def test_run_without_the_inference_layer_is_a_clear_error(tmp_path, capsys):
    ref = FIX / "viot" / "test_fire.json"
    rc = evaluate.main(["run", "--benchmark", "viot", "--checkpoint", str(tmp_path), "--data", str(ref)])
    assert rc == 2 and "error:" in capsys.readouterr().err


def test_run_gpt4tools_chain_is_scored_from_the_assembled_react_text(tmp_path):
    ref = FIX / "gpt4tools" / "gpt4tools_val_seen.json"
    script = {
        ("50", 0): {"text": "Thought: Do I need to use a tool? Yes\nAction: Edge Detection On Image\nAction Input: images/berdtnln.png\nObservation:"},
        ("50", 1): _call("Generate Image Condition On Canny Image", "image/ayffkvlr.png, busy city street with lots of cars at dusk"),
        ("50", 2): {"text": "Thought: Do I need to use a tool? No\nAI: Result saved as examples/wfydymnx.png"},
        ("29", 0): {"text": "Thought: Do I need to use a tool? No\nAI: Loud cheering came from the players."},
    }  # fmt: skip
    r = run_benchmark("gpt4tools", [ref], lambda ps: [script[(p["id"], p["step"])] for p in ps])
    assert r["metrics"]["SR"] == pytest.approx(1.0) and r["metrics"]["n"] == 2
    # a third call where the reference answers: recorded, and the chain stops there (no step 3 prompt).
    # Record 50: thoughts [Yes, Yes, Yes] vs [Yes, Yes] -> SR_t 2/3 -> SR 0; record 29 still right -> 0.5
    script[("50", 2)] = _call("Image Captioning", "examples/wfydymnx.png")
    seen = []
    r = run_benchmark(
        "gpt4tools", [ref], lambda ps: seen.extend(ps) or [script[(p["id"], p["step"])] for p in ps]
    )
    assert max(p["step"] for p in seen) == 2 and r["metrics"]["SR"] == pytest.approx(0.5)


def test_bad_input_is_named(tmp_path, capsys):
    ref = FIX / "viot" / "test_face.json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "chains": []}\n{"id": broken\n', encoding="utf-8")
    rc = evaluate.main(["score", "--benchmark", "viot", "--references", str(ref), "--predictions", str(bad)])
    assert rc == 2 and f"{bad}:line 2" in capsys.readouterr().err
    rc = evaluate.main(
        [
            "score",
            "--benchmark",
            "viot",
            "--references",
            str(ref),
            "--predictions",
            str(tmp_path / "nope.json"),
        ]
    )
    assert rc == 2 and "predictions file not found" in capsys.readouterr().err
    rc = evaluate.main(
        ["score", "--benchmark", "viot", "--strict", "--references", str(ref), "--predictions", str(bad)]
    )
    assert rc == 2 and "--strict" in capsys.readouterr().err
    # a training file is not a reference file
    train = FIX / "mllm-tool" / "audio_tx2t.json"
    with pytest.raises(EvalError, match=r"audio_tx2t.json:record 0: not an evaluation record"):
        load_references("mllm-tool", [train])
    # a generator that returns the wrong number of outputs
    with pytest.raises(EvalError, match="generator returned"):
        run_benchmark("viot", [ref], lambda ps: [])


def test_table_output_and_benchmark_list(tmp_path, capsys):
    ref = FIX / "viot" / "test_crowd.json"
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "nothing matches", "chains": []}) + "\n", encoding="utf-8")
    argv = ["score", "--benchmark", "viot", "--references", str(ref), "--predictions", str(preds)]
    assert evaluate.main([*argv, "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert "step_action_acc" in out
    assert "1 of 1 reference(s) without a prediction, excluded from every metric (1 x no prediction)" in out
    assert "1 prediction(s) matched no reference" in out
    assert evaluate.main(["benchmarks"]) == 0
    assert {"gpt4tools", "mllm-tool", "viot"} <= set(capsys.readouterr().out.split())


def test_read_step_prefers_react_text_then_calls_then_answer():
    react = "Thought: Do I need to use a tool? Yes.\nAction: Detect the Human Pose\nAction Input: v.mp4\nObservation:"
    named = [{"name": "Detect the Human Pose", "arguments": {"video_path": "v.mp4"}}]
    s = read_step({"text": react, "tool_calls": named})  # ReAct mode: thought and raw input kept
    assert (s.thought, s.name, s.input) == ("Do I need to use a tool? Yes.", "Detect the Human Pose", "v.mp4")
    s = read_step({"text": "", "tool_calls": named})  # token mode: the executed call
    assert (s.name, s.input, s.answer) == ("Detect the Human Pose", "v.mp4", None)
    s = read_step({"text": "Thought: Do I need to use a tool? No\nAI: Final Answer: none"})
    assert (s.name, s.answer) == (None, "none")
    assert read_step({"text": 42}).answer == ""  # never raises on a malformed output
