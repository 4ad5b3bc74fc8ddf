"""The demo's held-out metrics, its metrics.json / summary table, its tools and its encoder calibration.

Metric values are derived by hand from tiny inputs; the calibration test runs the real tiny ImageBind on
rendered demo media. The end-to-end run of ``scripts/demo.sh --small`` is in ``test_demo_e2e.py`` (slow).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from entry_points import load_script
from toollmm.demo import media
from toollmm.demo.eval import alignment_metrics, caption_metrics, demo_registry, named_value
from toollmm.demo.report import build_metrics, format_table, write_metrics
from toollmm.demo.tools import TOOL_NAMES, tool_conversation


def _ref(caption: str, **attrs) -> dict:
    return {"caption": caption, "attributes": attrs}


def test_caption_metrics_exact_chance_and_attributes():
    refs = [
        _ref("a red circle", colour="red", shape="circle"),
        _ref("a red square", colour="red", shape="square"),
        _ref("a blue cross", colour="blue", shape="cross"),
        _ref("a blue cross", colour="blue", shape="cross"),
    ]
    texts = ["a red circle", "a red circle", " a blue cross ", "a red blue cross"]
    m = caption_metrics(texts, refs, "image")
    assert m["exact"] == pytest.approx(2 / 4)  # surrounding spaces do not count against a caption
    assert m["chance"] == pytest.approx(1 / 3)  # three distinct held-out captions
    # colour: red, red, blue right; "red blue" names two colours -> wrong
    assert m["per_attribute"]["colour"] == {"acc": pytest.approx(3 / 4), "chance": pytest.approx(1 / 2)}
    # shape: circle right, circle for a square wrong, cross twice right
    assert m["per_attribute"]["shape"] == {"acc": pytest.approx(3 / 4), "chance": pytest.approx(1 / 3)}


def test_named_value_reads_whole_words_and_audio_pulse_phrases():
    assert named_value("a high slow pulsing tone", "audio", "pulse") == "slow"
    assert named_value("a high steady tone", "audio", "pulse") == "steady"
    assert named_value("a slow tone", "audio", "pulse") is None  # "slow" alone is not "slow pulsing"
    assert named_value("a red circle moving up", "video", "direction") == "up"
    assert named_value("a red circle moving upward", "video", "direction") is None
    assert named_value("a circle", "image", "colour") is None


def test_alignment_metrics_by_hand():
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[10.0, 0.0]])  # two captions, one query token each
    targets = torch.stack([a, b])
    pred = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[4.0, 0.0]])])
    m = alignment_metrics(pred, targets, torch.tensor([[5.0, 0.0]]), ["cap a", "cap b"])
    assert m["l2"] == pytest.approx((1 + 6) / 2)
    assert m["mean_predictor"] == pytest.approx(5.0)
    assert m["retrieval_top1"] == pytest.approx(0.5)  # 4 is nearer to a (0) than to b (10)
    assert m["retrieval_chance"] == pytest.approx(0.5)


@pytest.mark.parametrize("tool", TOOL_NAMES)
def test_demo_tools_answer_exactly_what_the_corpus_shows(tool):
    registry = demo_registry()
    for i in range(3):
        msgs, info = tool_conversation(tool, "heldout", np.random.default_rng([7, i]))
        res = registry.call(tool, info["arguments"])
        assert res.ok, res.error
        assert res.result == msgs[2]["content"]
    assert not registry.call(tool, {"nonsense": 1}).ok  # the corpus schema is enforced


def _fake_run(root, small=False):
    evals = {
        1: {
            "x2t": {
                m: {"exact": e, "chance": c, "per_attribute": pa, "n": 10, "examples": []}
                for m, e, c, pa in [
                    (
                        "image",
                        0.5,
                        1 / 24,
                        {"colour": {"acc": 0.9, "chance": 1 / 6}, "shape": {"acc": 0.5, "chance": 0.25}},
                    ),
                    (
                        "audio",
                        0.4,
                        1 / 9,
                        {"pitch": {"acc": 0.9, "chance": 1 / 3}, "pulse": {"acc": 0.45, "chance": 1 / 3}},
                    ),
                    (
                        "video",
                        0.9,
                        1 / 24,
                        {"colour": {"acc": 1.0, "chance": 1 / 6}, "direction": {"acc": 0.9, "chance": 0.25}},
                    ),
                ]
            },  # fmt: skip
            "t2x": {"l2": 4.0, "mean_predictor": 1.0, "retrieval_top1": 0.05},
        },
        2: {"t2x": {"l2": 0.4, "mean_predictor": 1.0, "retrieval_top1": 0.85, "per_modality": {}}},
        3: {"tools": {"tool_name_accuracy": 0.96, "tool_call_exact": 0.8, "per_tool_exact": {}}},
    }
    for n in range(4):
        d = root / f"stage_{n}"
        (d / "eval").mkdir(parents=True)
        (d / "stage.json").write_text(json.dumps({"wall_s": 10.0 * (n + 1), "steps": 5}))
        rows = [
            {"step": 1, "lm": 2.0, "tok_s": 100.0},
            {"step": 2, "lm": 1.0, "tok_s": 300.0},
            {"event": "end"},
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if n in evals:
            (d / "eval" / "demo.json").write_text(json.dumps(evals[n]))
    return root


def test_metrics_json_keys_values_and_targets(tmp_path):
    run = _fake_run(tmp_path / "demo")
    path = write_metrics(run, small=False, total_wall_s=123.456)
    m = json.loads(path.read_text())
    assert m["small"] is False and m["total_wall_s"] == pytest.approx(123.5)
    assert m["stage1"]["heldout"]["image"]["per_attribute"]["shape"] == {"acc": 0.5, "chance": 0.25}
    assert "examples" not in m["stage1"]["heldout"]["image"]
    assert m["stage1"]["wall_s"] == 20.0 and m["stage1"]["real_tokens_per_s"] == pytest.approx(200.0)
    assert m["stage2"]["heldout_align_l2"] == {"initial": 4.0, "final": 0.4, "mean_predictor": 1.0}
    assert m["stage2"]["heldout_retrieval_top1"] == 0.85
    assert m["stage3"]["heldout_tool_name_accuracy"] == 0.96 and m["stage3"]["wall_s"] == 40.0
    t = m["targets"]
    assert t["stage1.image.exact"]["met"] is True  # 0.5 >= 5/24
    assert t["stage1.audio.exact"]["met"] is False  # 0.4 < 5/9
    assert t["stage1.audio.attributes_over_1.5x_chance"] == {"value": 1, "target": ">= 2", "met": False}
    assert t["stage1.video.attributes_over_1.5x_chance"]["met"] is True
    assert t["stage2.final_l2"]["met"] is True and t["stage2.retrieval_top1"]["met"] is True
    assert t["stage3.tool_name_accuracy"]["met"] is True and t["stage3.tool_call_exact"]["met"] is False
    table = format_table(m)
    assert "4.000 -> 0.400" in table and "NO" in table and "stage 3: 40.0 s" in table


def test_metrics_report_missing_stage_is_not_a_pass(tmp_path):
    run = _fake_run(tmp_path / "demo")
    (run / "stage_3" / "eval" / "demo.json").unlink()
    m = build_metrics(run, small=True)
    assert m["stage3"]["heldout_tool_call_exact"] is None
    assert m["targets"]["stage3.tool_call_exact"]["met"] is None
    assert "-" in format_table(m)


def test_evaluate_cli_demo_report(tmp_path, capsys):
    cli = load_script("code/evaluate.py", "evaluate_cli")
    run = _fake_run(tmp_path / "demo")
    assert cli.main(["demo-report", "--run", str(run), "--small", "--total-wall-s", "9"]) == 0
    out = capsys.readouterr().out
    assert (
        "caption retrieval top-1" in out and json.loads((run / "metrics.json").read_text())["small"] is True
    )


# ----------------------------------------------------------------------------- encoder calibration
def test_zca_whitens():
    from toollmm.demo.base import zca

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    mean, white = zca(x)
    y = (x - mean) @ white.T
    assert torch.allclose(y.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(torch.cov(y.T), torch.eye(6), atol=1e-3)


def _spread(x: torch.Tensor) -> float:
    """Per-dimension spread of embeddings relative to the length of their mean."""
    return float(x.std(0).mean() / x.mean(0).norm())


def test_calibrated_heads_spread_the_embeddings_and_keep_the_trunk(tmp_path):
    from toollmm.core.config import load_config
    from toollmm.demo.base import calibrate_heads
    from toollmm.model.encoder import build_encoder

    cfg = load_config(config_files=["config/presets/encoder_tiny.yaml"]).config  # 32-d, random
    enc = build_encoder(cfg.model)
    rng = np.random.default_rng(0)
    images, tones = [], []
    for i in range(40):
        attrs = {"colour": list(media.COLOURS)[i % 6], "shape": media.SHAPES[i % 4]}
        media.save_image(media.render_image(attrs, rng), tmp_path / f"{i}.png")
        tone = {"pitch": list(media.PITCHES)[i % 3], "pulse": list(media.PULSES)[(i // 3) % 3]}
        media.save_wav(media.render_tone(tone, rng), tmp_path / f"{i}.wav")
        images.append(tmp_path / f"{i}.png")
        tones.append(tmp_path / f"{i}.wav")

    def embed():
        from toollmm.data.preprocess import load_media

        with torch.no_grad():
            return {
                m: enc.encode(m, torch.stack([load_media(m, f, enc.preprocess) for f in files]))[:, 0]
                for m, files in (("image", images), ("audio", tones))
            }

    trunk = {k: v.clone() for k, v in enc.model.modality_trunks.state_dict().items()}
    before = embed()
    counts = calibrate_heads(enc, {"image": images, "audio": tones})
    after = embed()
    assert counts == {"vision": 40, "audio": 40 * cfg.model.preprocess.audio_clips}
    for m in ("image", "audio"):
        assert _spread(after[m]) > 5 * _spread(before[m]), m
    assert torch.allclose(after["image"].norm(dim=-1), torch.ones(40), atol=1e-5)  # ImageBind's own L2 norm
    for k, v in enc.model.modality_trunks.state_dict().items():
        assert torch.equal(v, trunk[k]), k
    assert not math.isnan(float(after["audio"].sum()))
