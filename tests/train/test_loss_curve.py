"""Loss bookkeeping and loss.png: a loss term a batch did not have is absent (never a 0 that dives to the
floor of a log axis), validation is its own curve over steps, and the legend covers no data."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import BatchMaker, build_tiny, write_tiny_llama
from toollmm.train.tracking import MetricsWindow, loss_figure, plot_losses, term_present


@pytest.fixture(scope="module")
def model_and_maker(tiny_tokenizer_dir, tmp_path_factory):
    llm = write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))
    model = build_tiny(llm)
    return model, BatchMaker(model)


def test_window_means_count_only_batches_that_had_the_term(model_and_maker):
    """On the real ToolLMM: a text-only micro-batch returns ``align_image`` = 0 (the projection still runs
    for ZeRO-3); the window's mean must be the image batch's own alignment loss, not half of it."""
    model, maker = model_and_maker
    with_image = maker.batch(
        [maker.sample(("user", "USER: draw"), ("asst", "ASSISTANT: here"), ("signal", "image"))]
    )
    text_only = maker.batch([maker.sample(("user", "USER: hi"), ("asst", "ASSISTANT: hello"))])
    with torch.no_grad():
        out_img, out_txt = model(with_image), model(text_only)
    assert float(out_txt["align_image"]) == 0.0 and float(out_img["align_image"]) > 0.0
    assert term_present("align_image", with_image) and not term_present("align_image", text_only)
    assert term_present("lm", text_only)

    window = MetricsWindow()
    window.add(out_img, with_image)
    window.add(out_txt, text_only)
    assert window.mean("align_image") == pytest.approx(float(out_img["align_image"]))
    assert window.counts["align_image"] == 1 and window.counts["lm"] == 2
    assert window.mean("lm") == pytest.approx((float(out_img["lm"]) + float(out_txt["lm"])) / 2)
    # a window with no image batch at all has no measurement for the term
    empty = MetricsWindow()
    empty.add(out_txt, text_only)
    assert empty.counts["align_image"] == 0 and "align_image" in empty.sums  # key kept: same collective size


def _rows():
    rows = [{"step": 0, "event": "start"}]
    for step in range(10, 110, 10):
        row = {"step": step, "loss": 5.0 / step, "lm": 4.0 / step, "lr": 1e-3}
        if step % 20 == 0:  # windows without image targets have no align_image key
            row["align_image"] = 2.0 / step
        rows.append(row)
        if step % 50 == 0:
            rows.append({"step": step, "val_loss": 6.0 / step, "val_lm": 5.0 / step})
    rows.append({"step": 100, "event": "end"})
    return rows


def test_loss_figure_draws_present_points_only_validation_apart_legend_outside():
    fig = loss_figure(_rows())
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert {"loss", "lm", "align_image", "val_loss", "val_lm"} <= set(lines)
    assert "lr" not in lines
    # absent steps are not drawn, and nothing is drawn at or below 0
    assert list(lines["align_image"].get_xdata()) == [20, 40, 60, 80, 100]
    for ln in lines.values():
        assert min(ln.get_ydata()) > 0
    # validation: its own dashed curve over the steps it ran, with markers
    assert list(lines["val_loss"].get_xdata()) == [50, 100]
    assert lines["val_loss"].get_linestyle() == "--" and lines["val_loss"].get_marker() == "o"
    assert lines["loss"].get_linestyle() == "-"
    assert lines["val_loss"].get_color() == lines["loss"].get_color()  # same term, same colour
    # the legend sits outside the plotting area: its box does not overlap the axes' box
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    leg = ax.get_legend().get_window_extent(renderer)
    axes_box = ax.get_window_extent(renderer)
    assert leg.x0 >= axes_box.x1 or not leg.overlaps(axes_box)
    assert leg.x1 <= fig.bbox.x1 + 1  # and it is not cut off by the figure edge


def test_plot_losses_writes_a_png(tmp_path):
    import json

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    png = plot_losses(path, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_losses(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
