"""Stage-1 and stage-2 FLOP counts (toollmm.perf.flops, the MFU figures' batch counters): derived by hand on a
tiny shape, then checked against the FLOPs the real ToolLMM executes in a forward + backward of each stage's
trainable set and loss weights (torch's FlopCounterMode counts every matrix product that runs)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from toollmm.core.config import load_config
from toollmm.perf import flops
from toollmm.perf.train_figs import (
    sample_lengths,
    signal_spans,
    stage1_batch_flops,
    stage2_batch_flops,
)


def test_input_projection_flops_by_hand():
    # linear 32 -> 64 x 2 on 3 vectors: forward 2*32*128 + weight gradient 2*32*128 per vector
    assert flops.input_proj_train_flops(32, 64, 2, "linear", 3) == 3 * 4 * 32 * 128
    # mlp 32 -> 64 -> 128: first layer forward + weight grad; second also its input gradient
    assert flops.input_proj_train_flops(32, 64, 2, "mlp", 1) == 4 * 32 * 64 + 6 * 64 * 128
    with pytest.raises(ValueError, match="unknown input projection"):
        flops.input_proj_train_flops(32, 64, 1, "conv", 1)


def test_output_projection_flops_by_hand():
    p = flops.OutProjShape(hidden=8, d_model=4, ff=6, enc_layers=1, dec_layers=2, n_query=3, cond_dim=5)
    s = 2  # span tokens
    inp = 2 * s * 8 * 4
    enc = s * (8 * 16 + 4 * 4 * 6) + 4 * s * s * 4  # q/k/v/o + MLP on the span; full attention
    dec_self = 3 * 8 * 16 + 4 * 3 * 3 * 4
    dec_cross = 3 * 4 * 16 + s * 4 * 16 + 4 * 3 * s * 4  # q, o on queries; k, v on the span; scores + mix
    dec_mlp = 3 * 4 * 4 * 6
    out = 2 * 3 * 4 * 5
    fwd = inp + enc + 2 * (dec_self + dec_cross + dec_mlp) + out
    assert fwd == 3224
    assert flops.output_proj_forward_flops(p, s) == fwd
    assert flops.output_proj_attention_flops(p, s) == 4 * s * s * 4 + 2 * (4 * 3 * 3 * 4 + 4 * 3 * s * 4)
    assert flops.output_proj_train_flops(p, s) == 3 * fwd


def test_stage_totals_by_hand():
    shape = flops.LlamaShape(hidden=8, layers=2, intermediate=16, vocab=10, heads=2, kv_heads=2)
    base = flops.train_flops(shape, [3, 2], 2)  # 4 x 1320 x 5 + 4 x 80 x 2 + attention (test_bench)
    assert base == 4 * 1320 * 5 + 4 * 80 * 2 + 6 * 2 * 8 * (12 + 6)
    assert flops.stage1_flops(shape, [3, 2], 2, 1000.0) == base + 1000
    p = flops.OutProjShape(hidden=8, d_model=4, ff=6, enc_layers=1, dec_layers=2, n_query=3, cond_dim=5)
    assert flops.stage2_flops(shape, [3, 2], 2, [(p, 2, 2)]) == base + 2 * 3 * 3224
    assert flops.stage2_flops(shape, [3, 2], 2, []) == base


# ------------------------------------------------------------------ against what the real model runs
STAGE_PARTS = {1: ["input_proj"], 2: ["output_proj.image", "output_proj.video", "output_proj.audio",
                                      "token_rows.signal"]}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, tiny_tokenizer_dir):
    from model_fixtures import write_tiny_llama

    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llm"))


def _stage_model(tiny_llm, stage: int, proj_type: str):
    from model_fixtures import build_tiny

    model = build_tiny(tiny_llm, lora=False, proj_type=proj_type, tokens_per_input=2)
    model.loss_weights = dict(load_config(stage=stage).config.train.loss_weights)  # stage N's losses
    model.trainable_parameters(STAGE_PARTS[stage])
    return model.train()


def _executed(model, batch) -> float:
    """Matrix-product FLOPs of one forward + backward, without attention kernels (the counter does not
    see CPU sdpa, packed attention or nn.MultiheadAttention's; a counted one is taken out so the check
    does not depend on that)."""
    fc = FlopCounterMode(display=False)
    with fc:
        model(batch)["loss"].backward()
    attn = sum(v for op, v in fc.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op))
    return fc.get_total_flops() - attn


def _uncounted(model, batch, shape, row_grads: int) -> float:
    """What the model runs that the formulas leave out (or counts that do not run): the new token rows'
    LM-head products (forward, input gradient, and ``row_grads`` = their weight gradient when they
    train), and minus the norms' share of ``body_params`` (the formula's 4 x params x tokens counts them;
    they are element-wise, not matrix products); attention is excluded on both sides."""
    from toollmm.model.losses import next_token_targets

    tokens = sum(sample_lengths(batch))
    keep, _ = next_token_targets(batch.labels, batch.position_ids == 0)
    n_new = int(model.bundle.rows["head"].ids.numel())
    head_rows = (4 + 2 * row_grads) * int(keep.sum()) * n_new * shape.hidden
    norms = 4 * (2 * shape.layers + 1) * shape.hidden * tokens
    attn = flops.attention_train_flops(shape, sample_lengths(batch))
    proj_attn = sum(3 * k * flops.output_proj_attention_flops(p, n) for p, n, k in signal_spans(model, batch))
    return head_rows - norms - attn - proj_attn


def _idle(model, m: str, passes: int) -> float:
    """An output projection on a zero span, without its attention products: forward only (``passes`` 1,
    no gradient) or with gradients (3)."""
    p = flops.OutProjShape.of(model.output_proj[m])
    n = len(model.bundle.token_ids.signal[m])
    return passes * (flops.output_proj_forward_flops(p, n) - flops.output_proj_attention_flops(p, n))


@pytest.mark.parametrize("proj_type", ["linear", "mlp"])
def test_stage1_flops_match_the_real_step(tiny_llm, proj_type):
    """Stage 1: the gradient crosses the frozen LLM body to the projected media tokens (4 x, not 2 x),
    the input projection trains; the output projections run forward only (align weight 0), on zero spans."""
    from model_fixtures import BatchMaker

    model = _stage_model(tiny_llm, 1, proj_type)
    mk = BatchMaker(model)
    samples = [
        mk.sample(("user", "USER: what is in"), ("media", "image", 1), ("asst", "ASSISTANT: a red circle")),
        mk.sample(("user", "USER: describe the sound"), ("media", "audio", 3), ("asst", "a high tone")),
    ]
    batch = mk.packed(samples, pad=0)
    shape = flops.LlamaShape.of(model.llm.config)
    idle = sum(_idle(model, m, 1) for m in model.output_proj)
    want = stage1_batch_flops(shape, model, batch) + _uncounted(model, batch, shape, row_grads=0) + idle
    assert _executed(model, batch) == pytest.approx(want, rel=1e-9)
    # the body's share is a full forward + backward: half of it would be far off
    assert 4 * shape.body_params * sum(sample_lengths(batch)) > 0.5 * want


def test_stage2_flops_match_the_real_step(tiny_llm):
    """Stage 2: the trained signal rows are inputs of the body and the LM loss is on, so the LLM runs
    forward AND backward; each real signal span trains its output projection (3 x forward); the modality
    without targets runs its projection on a zero span (with gradients, wasted; not counted by the figure);
    the frozen input projection runs once on a zero stand-in (no media)."""
    from model_fixtures import BatchMaker

    model = _stage_model(tiny_llm, 2, "linear")
    mk = BatchMaker(model)
    samples = [
        mk.sample(("user", "USER: draw a red circle"), ("asst", "ASSISTANT: here"), ("signal", "image")),
        mk.sample(("user", "USER: a high tone"), ("asst", "ASSISTANT: sure"), ("signal", "audio")),
        mk.sample(("user", "USER: and another circle"), ("asst", "ok"), ("signal", "image")),
    ]
    batch = mk.packed(samples, pad=0)
    spans = signal_spans(model, batch)
    assert sorted((s[1], s[2]) for s in spans) == [(4, 2), (8, 1)]  # two image spans, one audio span
    shape = flops.LlamaShape.of(model.llm.config)
    idle = _idle(model, "video", 3)
    proj_in = 2 * model.input_proj.in_dim * model.input_proj.hidden * model.input_proj.tokens_per_input
    want = stage2_batch_flops(shape, model, batch) + _uncounted(model, batch, shape, row_grads=1)
    assert _executed(model, batch) == pytest.approx(want + idle + proj_in, rel=1e-9)


def test_stage1_counter_refuses_pixels(tiny_llm):
    """The stage-1 figure counts the step without the encoder; a batch with pixels would hide its cost."""
    from toollmm.core.batch import MediaInputs

    model = _stage_model(tiny_llm, 1, "linear")
    from model_fixtures import BatchMaker

    mk = BatchMaker(model)
    batch = mk.packed([mk.sample(("user", "x"), ("media", "image", 1), ("asst", "y"))], pad=0)
    batch.media["image"] = MediaInputs(pixels=torch.zeros(1, 3, 4, 4), keys=["a"])
    with pytest.raises(ValueError, match="pixels"):
        stage1_batch_flops(flops.LlamaShape.of(model.llm.config), model, batch)


def test_split_step_is_the_trainers_step(tiny_llm):
    """``split_step`` (the time split of the stage figures) makes the loop's own calls: from the same state
    and batch it leaves the same parameters as ``train_step`` (``optimiser_step``), and its parts add up."""
    from model_fixtures import BatchMaker
    from toollmm.perf.train_step import split_step, train_step
    from toollmm.train.ds import init_distributed
    from toollmm.train.loop import make_engine

    init_distributed()
    cfg = load_config(stage=2, overrides=["train.micro_batch_size=1"]).config
    engines = []
    for _ in range(2):
        model = _stage_model(tiny_llm, 2, "linear")
        engine, dtype = make_engine(cfg, model, 10, 1)
        engine.train()
        engines.append(engine)
    mk = BatchMaker(engines[0].module)
    batch = mk.packed([mk.sample(("user", "USER: draw"), ("asst", "ok"), ("signal", "image"))], pad=0)
    before = [p.detach().clone() for p in engines[0].module.parameters() if p.requires_grad]
    for step in range(2):
        torch.manual_seed(step)
        train_step(engines[0], batch, dtype)
        torch.manual_seed(step)
        split = split_step(engines[1], batch, dtype)
        parts = ("forward_s", "backward_s", "grad_reduce_s", "optimizer_s")
        assert all(split[k] >= 0 for k in parts) and split["forward_s"] > 0 and split["backward_s"] > 0
        assert sum(split[k] for k in parts) == pytest.approx(split["total_s"])
    a, b = ([p for p in e.module.parameters() if p.requires_grad] for e in engines)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, before))  # the steps did train
