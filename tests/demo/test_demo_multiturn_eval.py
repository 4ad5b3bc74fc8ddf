"""The demo's held-out multi-turn metric (``toollmm.demo.eval.evaluate_multiturn``) on the real runtime:
chats played turn by turn through chat sessions of ``toollmm.load``'s runtime (tiny stage folder), the next
token scripted (``inference_fixtures.steer``) so which turns are right is known by construction; and its
row in metrics.json and the demo table, with demo.sh's 3-turn chat."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import toollmm
from inference_fixtures import IMAGE_SPAN, steer
from toollmm.core.toolcall import canonical_json
from toollmm.demo.eval import chat_turns, demo_registry, evaluate_multiturn
from toollmm.demo.report import build_metrics, format_table

CALL = {"name": "calculator", "arguments": {"a": 120, "b": 35, "op": "add"}}
TOOL_TURN = [
    {"role": "user", "content": "What is 120 plus 35?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
    {"role": "tool", "name": "calculator", "content": '{"result": 155}'},
    {"role": "assistant", "content": "The answer is 155."},
]
DRAW = [
    {"role": "user", "content": "Draw a blue triangle."},
    {"role": "assistant", "content": "Here is a blue triangle.",
     "generate": [{"modality": "image", "caption": "a blue triangle", "media": "media/x.png"}]},
]  # fmt: skip
DRAW2 = [DRAW[0], {**DRAW[1], "content": "Sure, here is an image of a blue triangle."}]
T_TOOL = {"kind": "tool", "tool": "calculator", "call": CALL, "answer": "The answer is 155."}
T_DRAW = {"kind": "generate", "modality": "image", "answer": "Here is a blue triangle."}


def _caption(answer: str) -> tuple[list[dict], dict]:
    msgs = [
        {"role": "user", "content": "<image>\nCaption this image."},
        {"role": "assistant", "content": answer},
    ]
    return msgs, {"kind": "caption", "modality": "image", "answer": answer}


def _rec(rid, parts, images=()):
    msgs = [m for p, _ in parts for m in p]
    return {"id": rid, "messages": msgs, "images": list(images), "eval": {"reference": [t for _, t in parts]}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_mt")
    (root / "media").mkdir()
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[6:26, 6:26] = (30, 30, 220)
    Image.fromarray(img).save(root / "media" / "blue.png")
    again = [{"role": "user", "content": "And once more, please?"}]  # no key of its own: only history helps
    recs = [
        # every turn right, alone and in the chat
        _rec("a", [(TOOL_TURN, T_TOOL), _caption("a blue square"), (DRAW, T_DRAW)], ["media/blue.png"]),
        # turn 2 is right only with its history (the scripted model repeats the calculator call)
        _rec("b", [(TOOL_TURN, T_TOOL), (again + TOOL_TURN[1:], T_TOOL)]),
        # the caption is wrong in both settings; the drawing right in both
        _rec("c", [_caption("a red circle"), (DRAW, T_DRAW)], ["media/blue.png"]),
        # a generation is right when its answer names the caption (training words answers two ways)
        _rec("d", [(DRAW2, {**T_DRAW, "answer": DRAW2[1]["content"]}), _caption("a blue square")],
             ["media/blue.png"]),
    ]  # fmt: skip
    (root / "heldout").mkdir()
    (root / "heldout" / "multiturn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


@pytest.fixture(scope="module")
def rt(tiny_stage_dir, tmp_path_factory):
    runtime = toollmm.load(
        tiny_stage_dir, output_dir=tmp_path_factory.mktemp("mt_out"), registry=demo_registry()
    )
    return steer(
        runtime,
        [
            ("plus", f"<tool_call>{canonical_json(CALL)}</tool_call> The answer is 155."),
            ("Caption", "a blue square"),
            ("Draw", "Here is a blue triangle." + IMAGE_SPAN),
        ],
    )


def test_chat_turns_give_each_turn_its_own_media(data_dir):
    rec = json.loads((data_dir / "heldout" / "multiturn.jsonl").read_text().splitlines()[0])
    turns = chat_turns(rec, data_dir, "f")
    assert [t for t, _ in turns] == [
        "What is 120 plus 35?",
        "<image>\nCaption this image.",
        "Draw a blue triangle.",
    ]
    assert [m for _, m in turns] == [[], [("image", str(data_dir / "media/blue.png"))], []]
    with pytest.raises(Exception, match="more <image> placeholders"):
        chat_turns({**rec, "images": []}, data_dir, "f")


def test_every_assistant_turn_is_scored_in_the_chat_and_alone(rt, data_dir):
    out = evaluate_multiturn(rt, data_dir, None, batch_size=2)
    # in the chats: a 3/3, b 2/2, c 1/2, d 2/2; alone: a 3/3, b 1/2 (no key: the model ends at once), c 1/2, d 2/2
    assert out["n_conversations"] == 4 and out["n_turns"] == 9
    assert out["turn_accuracy"] == pytest.approx(8 / 9)
    assert out["single_turn_accuracy"] == pytest.approx(7 / 9)
    assert out["ratio"] == pytest.approx(8 / 7)
    assert out["conversation_exact"] == pytest.approx(3 / 4)
    assert out["per_kind"]["tool"] == {"multi": 1.0, "single": pytest.approx(2 / 3), "n": 3}
    assert (
        out["per_kind"]["caption"]["multi"] == pytest.approx(2 / 3)
        and out["per_kind"]["generate"]["multi"] == 1.0
    )
    assert out["per_turn_index"] == {"turn_1": 0.75, "turn_2": 1.0, "turn_3": 1.0}
    [miss] = out["misses"]
    assert miss["id"] == "c" and miss["turn"] == 1 and miss["expected"] == "a red circle"
    assert rt.engine.signal_hook is rt.decoder  # the span marker was only lent for the evaluation
    assert not list(rt.output_dir.glob("image_*"))  # no file decoded for the scored spans


def test_multiturn_row_target_and_chat_in_the_report(tmp_path):
    run = tmp_path / "demo"
    ev = {"tools": {"tool_name_accuracy": 1.0, "tool_call_exact": 0.9, "per_tool_exact": {}},
          "multiturn": {"turn_accuracy": 0.8, "single_turn_accuracy": 0.95, "ratio": 0.8 / 0.95, "misses": []}}  # fmt: skip
    (run / "stage_3" / "eval").mkdir(parents=True)
    (run / "stage_3" / "eval" / "demo.json").write_text(json.dumps(ev))
    out = {"text": "Here is a blue triangle.", "tool_calls": [], "errors": [],
           "media": [{"modality": "image", "path": "/r/chat/image_0.png", "seed": 0}]}  # fmt: skip
    chat = {"turns": [{"user": "Draw a blue triangle.", "images": [], "output": out}]}
    (run / "chat.json").write_text(json.dumps(chat))
    m = build_metrics(run, small=True)
    assert m["stage3"]["heldout_multiturn"]["turn_accuracy"] == 0.8
    assert "misses" not in m["stage3"]["heldout_multiturn"]
    assert m["targets"]["stage3.multiturn_ratio"] == {"value": 0.8 / 0.95, "target": ">= 0.9", "met": False}
    table = format_table(m)
    assert "multi-turn chats: every turn / same turns alone  0.800 / 0.950 = 0.842" in table
    assert "user: Draw a blue triangle." in table and "[image: /r/chat/image_0.png]" in table
    (run / "chat.json").unlink()
    (run / "stage_3" / "eval" / "demo.json").write_text(json.dumps({"tools": ev["tools"]}))
    m = build_metrics(run, small=True)
    assert m["targets"]["stage3.multiturn_ratio"]["met"] is None and "chat" not in m
