"""GPT4Tools scoring: BLEU-1 by hand, then SR_t / SR_act / SR_args / SR / IoU on the shared validation records
(tests/fixtures/samples/gpt4tools/gpt4tools_val_seen.json) with documented edits. Every expected value is
derived in the comments from the definitions of AILab-CVC/GPT4Tools eval/evaluate_result.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from toollmm.eval import EvalError, MissingError, ScoreOptions, score_files, score_predictions
from toollmm.eval.common import load_references
from toollmm.eval.gpt4tools import score_item, strip_prompt
from toollmm.eval.metrics import bleu1

FIX = Path(__file__).parents[1] / "fixtures" / "samples" / "gpt4tools"
VAL = FIX / "gpt4tools_val_seen.json"
RAW = {r["id"]: r for r in json.loads(VAL.read_text(encoding="utf-8"))}
CHAIN, NO_TOOL = RAW[50], RAW[29]  # a two-step tool chain; an answer without a tool

Y, N = "Thought: Do I need to use a tool? Yes\n", "Thought: Do I need to use a tool? No\n"
EDGE = (
    "Action: Edge Detection On Image\nAction Input: images/berdtnln.png\nObservation:\nimage/ayffkvlr.png\n"
)
CANNY = (
    "Action: Generate Image Condition On Canny Image\nAction Input: {}\nObservation:\nResult saved as x.png\n"
)
TEXT = "busy city street with lots of cars at dusk"  # 9 words


# ---------------------------------------------------------------------------------------- BLEU-1
# BLEU-1 = (correct + 1e-15) / (len(hyp) + 1e-9) * BP, BP = exp(1 - 1/ratio) when ratio = len(hyp)/len(ref) < 1
@pytest.mark.parametrize(
    "ref, hyp, expected",
    [
        ("a b c", "a b c", 1.0),  # 3/3, ratio 1 -> 1
        ("a red car on the road", "red car", math.exp(-2)),  # precision 2/2; ratio 2/6 -> exp(1 - 3)
        ("a b c d", "a b c", math.exp(-1 / 3)),  # precision 1; ratio 3/4 -> exp(1 - 4/3)
        ("cat", "the cat the cat", 0.25),  # 'cat' clipped to 1, 'the' 0 -> 1/4; longer: no penalty
        ("a b c d", "a b c x y z", 0.5),  # 3 of 6 words; ratio 6/4 >= 1
        ("the cat sat", "the the dog", 1 / 3),  # 'the' clipped to 1 of 2 -> 1/3
        ("Cat", "cat", 0.0),  # case kept: no match -> 1e-15 / 1
        ("a b", "", 0.0),  # empty hypothesis: 1e-6 * exp(1 - 1e15 * 2) = 0
        (" busy city street", "busy  city\tstreet ", 1.0),  # whitespace split
    ],
)
def test_bleu1_matches_hand_computed_values(ref, hyp, expected):
    assert bleu1(ref, hyp) == pytest.approx(expected, abs=1e-8)


def test_bleu1_brevity_penalty_is_what_lowers_a_short_exact_prefix():
    # same precision (1.0), only the length differs: 'busy street' against the 9-word argument
    assert bleu1(TEXT, "busy street") == pytest.approx(math.exp(1 - 9 / 2))
    assert bleu1(TEXT, TEXT + " extra") == pytest.approx(9 / 10)  # longer: precision only


# ----------------------------------------------------------------------------- one item at a time
def test_exact_chain_scores_one_everywhere():
    s = score_item(CHAIN["output"], CHAIN["output"].strip())
    assert s == pytest.approx({"SR_t": 1, "SR_act": 1, "SR_args": 1, "SR": 1, "IoU": 1}, abs=1e-8)


def test_missing_second_step():
    # pred thoughts [Yes, No], actions [Edge], args [images/berdtnln.png]
    # actions over max(2, 1) = 2 positions: [1, 0] -> 0.5; args [1, 0] -> 0.5
    # thoughts: 2 == 1 + 1 and last 'No' -> dropped -> [Yes] vs [Yes, Yes] -> [1, 0] -> 0.5; SR 0
    # IoU: flags 1,0 | 1,0 | 1,0 = 3 over union 6 -> 0.5
    pred = Y + EDGE + N + "AI: image/ayffkvlr.png"
    assert score_item(CHAIN["output"], pred) == pytest.approx(
        {"SR_t": 0.5, "SR_act": 0.5, "SR_args": 0.5, "SR": 0.0, "IoU": 0.5}
    )


def test_extra_step_lowers_rates_but_not_iou():
    # three calls: thoughts [Yes, Yes, Yes, No] -> trailing No dropped -> [1, 1, 0] over 3 = 2/3, same for
    # actions and args (third position has no reference). IoU: extra positions are 0 in both flags and
    # expectations, so intersection 6 over union 6 = 1 (the published definition ignores extra steps).
    extra = "Action: Image Captioning\nAction Input: x.png\nObservation:\na street\n"
    pred = Y + EDGE + Y + CANNY.format("image/ayffkvlr.png, " + TEXT) + Y + extra + N + "AI: done"
    s = score_item(CHAIN["output"], pred)
    assert s == pytest.approx({"SR_t": 2 / 3, "SR_act": 2 / 3, "SR_args": 2 / 3, "SR": 0.0, "IoU": 1.0})


def test_wrong_argument_count_zeroes_that_step_only():
    # step 2 input has 1 comma piece, the reference 2 -> step 2 args 0; SR_args (1 + 0) / 2 = 0.5 >= 0.5
    # so SR is still 1; IoU (2 + 2 + 1) / 6
    pred = Y + EDGE + Y + CANNY.format("image/ayffkvlr.png") + N + "AI: done"
    s = score_item(CHAIN["output"], pred)
    assert s == pytest.approx({"SR_t": 1, "SR_act": 1, "SR_args": 0.5, "SR": 1, "IoU": 5 / 6})


def test_text_argument_scored_with_bleu1():
    # step 2 text ' busy street at night' vs ' busy city street with lots of cars at dusk' (9 words):
    # correct 3 (busy, street, at) of 4 -> 0.75; BP exp(1 - 9/4) -> 0.75 * exp(-1.25) = 0.2148794
    # step 2 = mean(png 1.0, 0.2148794) = 0.6074397; SR_args = (1 + 0.6074397) / 2 = 0.8037198; SR 1
    # IoU = (2 + 2 + 1 + 0.6074397) / 6 = 0.9345733
    bleu = 0.75 * math.exp(-1.25)
    pred = Y + EDGE + Y + CANNY.format("image/ayffkvlr.png, busy street at night") + N + "AI: done"
    s = score_item(CHAIN["output"], pred)
    assert s["SR_args"] == pytest.approx((1 + (1 + bleu) / 2) / 2)
    assert s["SR"] == 1.0
    assert s["IoU"] == pytest.approx((5 + (1 + bleu) / 2) / 6)


def test_image_path_rule_and_strict_paths():
    # both paths are other .png files: the published rule only asks for '.png' -> args ~1, SR 1.
    # strict (the paper): paths must be equal -> step 1 = 0, step 2 = mean(0, ~1) = 0.5 -> SR_args 0.25, SR 0
    pred = (
        Y
        + EDGE.replace("images/berdtnln.png", "images/other.png")
        + Y
        + CANNY.format("image/zzz.png, " + TEXT)
        + N
        + "AI: done"
    )
    loose, strict = score_item(CHAIN["output"], pred), score_item(CHAIN["output"], pred, strict=True)
    assert loose["SR_args"] == pytest.approx(1.0) and loose["SR"] == 1.0
    assert strict["SR_args"] == pytest.approx(0.25) and strict["SR"] == 0.0
    # a path that lost '.png' fails its whole step even without strict: (0 + 1) / 2
    no_png = (
        Y + EDGE.replace("berdtnln.png", "berdtnln.jpg") + Y + CANNY.format("image/ayffkvlr.png, " + TEXT)
    )
    assert score_item(CHAIN["output"], no_png + N + "AI: x")["SR_args"] == pytest.approx(0.5)


def test_only_one_trailing_no_is_tolerated():
    # thoughts [Yes, Yes, No, No] with 2 actions: 4 != 3, nothing dropped -> [1, 1, 0, 0] -> 0.5, SR 0
    pred = Y + EDGE + Y + CANNY.format("image/ayffkvlr.png, " + TEXT) + N + N + "AI: done"
    s = score_item(CHAIN["output"], pred)
    assert s["SR_t"] == pytest.approx(0.5) and s["SR"] == 0.0 and s["SR_act"] == 1.0


def test_no_tool_reference_needs_no_and_an_ai_line():
    gt = NO_TOOL["output"]
    assert score_item(gt, N + "AI: The players cheered.")["SR"] == 1.0
    # a tool call where none is needed: thoughts [Yes] vs [No] -> 0; everything 0; IoU 0 / 1
    called = score_item(gt, Y + "Action: Image Captioning\nAction Input: a.png\nObservation:")
    assert called == {"SR_t": 0.0, "SR_act": 0.0, "SR_args": 0.0, "SR": 0.0, "IoU": 0.0}
    # 'No' without an 'AI: ' line: SR_t forced to 0 (so all 0), but IoU uses the thought flags: 1 / 1
    no_ai = score_item(gt, "Thought: Do I need to use a tool? No")
    assert no_ai == {"SR_t": 0.0, "SR_act": 0.0, "SR_args": 0.0, "SR": 0.0, "IoU": 1.0}


def test_prompt_in_front_is_removed():
    inst, out = CHAIN["instruction"], CHAIN["output"]
    assert strip_prompt(inst + out, inst) == out
    assert strip_prompt(out, inst) == out  # no prompt
    # decoding changed the prompt's start (BOS text, lost leading space): found by the prompt's tail
    assert strip_prompt("<s> " + inst[1:] + out, inst).strip() == out.strip()


# -------------------------------------------------------------------------------- whole files
def _preds(tmp_path: Path, items: list[dict], name: str = "preds.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(items), encoding="utf-8")
    return p


def test_file_scores_aggregate_and_prediction_forms(tmp_path):
    # id 50: text-argument case above (SR_t 1, SR_act 1, SR_args 0.8037198, SR 1, IoU 0.9345733), given
    #        with the prompt in front and as a list whose first element is used;
    # id 29: 'No' without 'AI:' (all 0, IoU 1), output without the prompt.
    bleu = 0.75 * math.exp(-1.25)
    args50, iou50 = (1 + (1 + bleu) / 2) / 2, (5 + (1 + bleu) / 2) / 6
    out50 = Y + EDGE + Y + CANNY.format("image/ayffkvlr.png, busy street at night") + N + "AI: done"
    preds = _preds(
        tmp_path,
        [
            {"id": 50, "output": [CHAIN["instruction"] + out50, "ignored second sample"]},
            {"id": 29, "output": "Thought: Do I need to use a tool? No"},
        ],
    )
    m = score_files("gpt4tools", [VAL], [preds])["metrics"]
    assert m["n"] == 2 and m["missing"] == 0
    assert m["SR_t"] == pytest.approx(0.5) and m["SR_act"] == pytest.approx(0.5)
    assert m["SR_args"] == pytest.approx(args50 / 2)
    assert m["SR"] == pytest.approx(0.5)
    assert m["IoU"] == pytest.approx((iou50 + 1) / 2)
    assert m["by_split"]["seen"]["n"] == 2  # the file name says 'seen'


def test_missing_prediction_fails_unless_allowed(tmp_path):
    preds = _preds(tmp_path, [{"id": 50, "output": CHAIN["output"]}])
    with pytest.raises(MissingError, match=r"1 of 2 reference\(s\) have no prediction") as e:
        score_files("gpt4tools", [VAL], [preds])
    assert [i for i, _ in e.value.missing] == ["29"]
    for opts in (ScoreOptions(compat=True), ScoreOptions(allow_missing=True)):
        result = score_files("gpt4tools", [VAL], [preds], opts)
        m = result["metrics"]
        assert m["n"] == 1 and m["missing"] == 1 and m["SR"] == pytest.approx(1.0)
        assert result["missing"]["requests"] == [{"id": "29", "reason": "no prediction"}]
    # the scorer itself, given None for a reference, counts it as a failure (library callers)
    refs = load_references("gpt4tools", [VAL], {"eval": "true"})
    by_id = {r.id: r for r in refs}
    order = [by_id["50"], by_id["29"]]
    m = score_predictions("gpt4tools", order, [{"output": CHAIN["output"]}, None], ScoreOptions())
    assert m["n"] == 2 and m["missing"] == 1  # id 29 scores 0 everywhere
    assert m["SR"] == pytest.approx(0.5) and m["IoU"] == pytest.approx(0.5)


def test_batch_output_form(tmp_path):
    # the inference --batch JSONL: tool_calls (with their results) plus the final text -> a perfect chain
    calls = [
        {"name": "Edge Detection On Image", "arguments": {"input": "images/berdtnln.png"}, "result": "a.png"},
        {
            "name": "Generate Image Condition On Canny Image",
            "arguments": {"input": "image/ayffkvlr.png, " + TEXT},
            "result": "b.png",
        },
    ]
    lines = [
        {"id": "50", "text": "Result saved as b.png", "tool_calls": calls, "media": [], "errors": []},
        {"id": "29", "text": "The players cheered loudly.", "tool_calls": []},
    ]
    p = tmp_path / "batch.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    m = score_files("gpt4tools", [VAL], [p])["metrics"]
    assert m["SR"] == pytest.approx(1.0) and m["SR_args"] == pytest.approx(1.0)


def test_seen_and_unseen_reported_separately(tmp_path):
    unseen = tmp_path / "gpt4tools_test_unseen.json"
    shutil.copy(VAL, unseen)  # same ids in both files
    good = _preds(tmp_path, [{"id": 50, "output": CHAIN["output"]}, {"id": 29, "output": NO_TOOL["output"]}])
    bad = _preds(tmp_path, [{"id": 50, "output": "nothing"}, {"id": 29, "output": "nothing"}], "bad.json")
    with pytest.raises(EvalError, match="one --predictions file per --references file"):
        score_files("gpt4tools", [VAL, unseen], [good])  # ids repeat across the two files
    r = score_files("gpt4tools", [VAL, unseen], [good, bad])
    split = r["metrics"]["by_split"]
    assert split["seen"]["SR"] == pytest.approx(1.0) and split["unseen"]["SR"] == 0.0
    assert r["metrics"]["SR"] == pytest.approx(0.5) and r["metrics"]["n"] == 4
