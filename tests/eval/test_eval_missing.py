"""Evaluation never reports a number it did not compute (issue 21, items 1-2).

``evaluate.py run`` through the real ``toollmm.load`` on a tiny stage folder and the real MLLM-Tool sample
(7 records, 6 with media): media that cannot be found make their requests "not run"; the command fails
(exit 1, listing them) unless ``--allow-missing``, which scores the others and reports the rest with
reasons; ``--media-root`` finds the media. ``score`` applies the same policy to references without a
prediction, refuses prediction objects with no answer key it reads, and reads GPT4Tools reference files
holding only ``id``/``instruction``/``output`` (what the published scorer reads).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _media import write_image, write_mp4, write_wav
from entry_points import load_script
from toollmm.eval import ScoreOptions, score_files

FIX = Path(__file__).parents[1] / "fixtures" / "samples"
MLLM = FIX / "mllm-tool" / "combined_data.json"
G4T = FIX / "gpt4tools" / "gpt4tools_val_seen.json"


def _entry():
    return load_script("code/evaluate.py", "evaluate_entry_missing")


evaluate = _entry()


def _run(ckpt: Path, out: Path, *extra: str, as_json: bool = True) -> list[str]:
    return ["run", "--benchmark", "mllm-tool", "--checkpoint", str(ckpt), "--data", str(MLLM),
            "--output", str(out), *(["--json"] if as_json else []), *extra]  # fmt: skip


def test_requests_not_run_fail_the_run_unless_allowed(tiny_stage_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(_run(tiny_stage_dir, out)) == 1
    err = capsys.readouterr().err
    assert "6 of 7 reference(s) were not run (6 x file not found); no metric was computed" in err
    assert "video-1: request video-1:" in err and "--media-root" in err and "--allow-missing" in err
    written = json.loads((out / "mllm-tool.json").read_text(encoding="utf-8"))
    assert written["metrics"] is None and written["not_run"]["count"] == 6
    preds = [json.loads(x) for x in (out / "mllm-tool.predictions.jsonl").read_text().splitlines()]
    assert sum("not_run" in p for p in preds) == 6 and len(preds) == 7

    assert evaluate.main(_run(tiny_stage_dir, out, "--allow-missing")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["n"] == 1 and result["metrics"]["missing"] == 6  # only the text record scored
    assert set(result["metrics"]["by_modality"]) == {"text"}
    nr = result["not_run"]
    assert (nr["count"], nr["of"], nr["reasons"]) == (6, 7, {"file not found": 6})
    assert {r["id"] for r in nr["requests"]} == {
        "video-1",
        "video-11",
        "image-0",
        "image-4",
        "audio-1",
        "audio-81",
    }

    # the table says what was excluded, next to the numbers
    assert evaluate.main(_run(tiny_stage_dir, out, "--allow-missing", as_json=False)) == 0
    table = capsys.readouterr().out
    assert "6 of 7 request(s) not run, excluded from every metric (6 x file not found)" in table


def test_media_root_finds_the_media(tiny_stage_dir, tmp_path, capsys):
    root = tmp_path / "media"
    from toollmm.eval.common import load_references

    writers = {"images": lambda p: write_image(p, 64, 48), "audios": lambda p: write_wav(p, seconds=1.0),
               "videos": lambda p: write_mp4(p, frames=12, width=64, height=48)}  # fmt: skip
    for ref in load_references("mllm-tool", [MLLM]):  # the layout MLLM-Tool's media root has
        for key, write in writers.items():
            for rel in ref.record.get(key) or []:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                write(root / rel)
    out = tmp_path / "eval"
    assert evaluate.main(_run(tiny_stage_dir, out, "--media-root", str(root))) == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        result["not_run"]["count"] == 0 and result["metrics"]["n"] == 7 and result["metrics"]["missing"] == 0
    )


def test_score_missing_predictions_policy(tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "text-1", "text": "unknown"}) + "\n", encoding="utf-8")
    argv = ["score", "--benchmark", "mllm-tool", "--references", str(MLLM), "--predictions", str(preds)]
    assert evaluate.main([*argv, "--json"]) == 1
    err = capsys.readouterr().err
    assert "6 of 7 reference(s) have no prediction" in err and "image-0: no prediction" in err
    assert evaluate.main([*argv, "--json", "--allow-missing"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["n"] == 1 and result["missing"]["count"] == 6


def test_unknown_prediction_keys_are_an_error(tmp_path, capsys):
    """``{"id": 50, "prediction": ...}`` scored 0 silently; a key the scorer reads scores it."""
    chain = json.loads(G4T.read_text(encoding="utf-8"))
    by_id = {r["id"]: r for r in chain}
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text(json.dumps([{"id": i, "prediction": r["output"]} for i, r in by_id.items()]))
    good.write_text(json.dumps([{"id": i, "text": r["output"]} for i, r in by_id.items()]))
    argv = ["score", "--benchmark", "gpt4tools", "--references", str(G4T), "--json", "--predictions"]
    assert evaluate.main([*argv, str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:record 0" in err and "keys found: 'id', 'prediction'" in err
    assert "answer keys accepted: output, react, text, tool_calls" in err
    assert evaluate.main([*argv, str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["SR"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "benchmark, refs, accepted",
    [
        ("mllm-tool", MLLM, "response, text, tool_calls"),
        ("viot", FIX / "viot" / "test_crowd.json", "chains, text, tool_calls"),
    ],
)
def test_every_benchmark_names_its_answer_keys(tmp_path, benchmark, refs, accepted):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": 1, "answer": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"keys found: 'id', 'answer'; answer keys accepted: {accepted}"):
        score_files(benchmark, [refs], [p])


def test_gpt4tools_references_with_only_id_instruction_output(tmp_path):
    """The published scorer reads only id / instruction / output; so do we (tools from the prompt)."""
    full = json.loads(G4T.read_text(encoding="utf-8"))
    slim = tmp_path / "gpt4tools_val_seen.json"
    slim.write_text(json.dumps([{k: r[k] for k in ("id", "instruction", "output")} for r in full]))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"id": r["id"], "output": r["output"]} for r in full[:1]]))
    a = score_files("gpt4tools", [G4T], [preds], ScoreOptions(allow_missing=True))["metrics"]
    b = score_files("gpt4tools", [slim], [preds], ScoreOptions(allow_missing=True))["metrics"]
    assert a == b and b["n"] == 1 and b["SR"] == pytest.approx(1.0)
    from toollmm.eval.common import load_references

    [ref, _] = load_references("gpt4tools", [slim], {"eval": "true"})
    names = [t["function"]["name"] for t in ref.record["tools"]]
    assert names == ["Generate Image Condition On Canny Image", "Edge Detection On Image"]
