"""The training forward computes logits only where a supervised token is predicted: same loss, same gradients
as the full-logits reference (``lm_loss`` over ``[B, T, V]``), padded and packed."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import BatchMaker, build_tiny, mixed_samples, write_tiny_llama
from toollmm.core.batch import IGNORE_INDEX
from toollmm.model.losses import l2_alignment, lm_loss, lm_loss_at, next_token_targets


@pytest.fixture(scope="module")
def llm_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


def test_next_token_targets_by_hand():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, 9, 10]])
    keep, targets = next_token_targets(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9, 10]
    starts = torch.tensor([[True, False, False, False, False], [True, False, True, False, False]])
    keep, targets = next_token_targets(labels, starts)  # row 1: a sample starts at 2, so 8 is not predicted
    assert keep[1].tolist() == [True, False, True, True, False] and targets.tolist() == [5, 6, 7, 9, 10]


def _reference(model, batch):
    """The full-logits path: LM loss over every position, alignment from every layer's hidden states."""
    packed = batch.attention_mask.dim() == 4
    out = model.run_llm(batch)
    return lm_loss(out.logits, batch.labels, (batch.position_ids == 0) if packed else None)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_and_gradients_match_full_logits(layout, llm_dir):
    m = build_tiny(llm_dir, tokens_per_input=2, r=4)
    m.trainable_parameters(["lora", "input_proj", "token_rows.signal", "token_rows.tool"])
    maker = BatchMaker(m)
    samples = mixed_samples(maker)
    batch = maker.batch(samples) if layout == "padded" else maker.packed(samples, pad=5)
    params = [p for p in m.parameters() if p.requires_grad]
    # LoRA B starts at zero, so A has no gradient yet: move B off zero to test every path
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    seen = []
    hook = m.llm.get_output_embeddings().register_forward_hook(lambda mod, a, o: seen.append(a[0].shape))
    fast = m(batch)["lm"]
    hook.remove()
    keep, _ = next_token_targets(batch.labels, (batch.position_ids == 0) if layout == "packed" else None)
    assert seen == [torch.Size([int(keep.sum()), m.bundle.hidden_size])]  # the head ran on those rows only
    g_fast = torch.autograd.grad(fast, params)
    ref = _reference(m, batch)
    g_ref = torch.autograd.grad(ref, params)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert sum(float(g.abs().sum()) for g in g_fast) > 0


def test_no_supervised_token_is_an_exact_zero_with_a_graph(llm_dir):
    m = build_tiny(llm_dir)
    m.trainable_parameters(["lora", "input_proj"])
    maker = BatchMaker(m)
    batch = maker.batch([maker.sample(("user", "USER: nothing to learn here"))])
    batch.labels[:] = IGNORE_INDEX
    out = m(batch)
    assert out["lm"].item() == 0.0 and out["lm"].requires_grad
    out["loss"].backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert lm_loss_at(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_caption_targets_keep_float32_on_a_bf16_batch(llm_dir):
    """``Batch.to(device, bf16)`` casts media, not the L2 loss's caption targets, and the bf16 model's
    alignment loss is measured against the float32 targets."""
    model = build_tiny(llm_dir).to(torch.bfloat16)
    maker = BatchMaker(model)
    batch = maker.batch(mixed_samples(maker)[:1])
    fp32 = batch.signal_targets["image"].embeddings
    assert fp32.dtype == torch.float32 and not torch.equal(fp32.bfloat16().float(), fp32)
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.media["image"].features.dtype == torch.bfloat16
    assert moved.signal_targets["image"].embeddings.dtype == torch.float32
    assert torch.equal(moved.signal_targets["image"].embeddings, fp32)
    preds = []
    model.output_proj["image"].register_forward_hook(lambda mod, args, out: preds.append(out))
    with torch.no_grad():
        loss = model(moved)["align_image"]
    torch.testing.assert_close(loss, l2_alignment(preds[-1], fp32), rtol=0, atol=0)
