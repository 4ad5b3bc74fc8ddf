"""Packed SDPA: attention inside each packed sample equals the dense block-diagonal mask, forward and
backward, and the model built with ``sdpa`` takes that path for packed batches."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import BatchMaker, build_tiny, mixed_samples, write_tiny_llama
from toollmm.model.packed_attention import PACKED_SDPA, spans


@pytest.fixture(scope="module")
def llm_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


def test_spans_by_hand():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 0, 1, 2, 3, 0, 1]])
    assert spans(pos) == [[(0, 3), (3, 5), (5, 8)], [(0, 8)], [(0, 2), (2, 6), (6, 8)]]
    assert spans(torch.tensor([[3, 4, 0, 1]])) == [[(0, 2), (2, 4)]]  # a row not starting at 0


def test_model_uses_packed_sdpa_and_matches_the_dense_mask(llm_dir):
    packed_model = build_tiny(llm_dir, tokens_per_input=2, r=4)
    dense_model = build_tiny(llm_dir, tokens_per_input=2, r=4, attn="eager")  # same seed, same weights
    assert packed_model.bundle.attn_implementation == PACKED_SDPA
    for m in (packed_model, dense_model):
        m.trainable_parameters(["lora", "input_proj", "token_rows.signal", "token_rows.tool"])
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape))
    samples = mixed_samples(BatchMaker(packed_model))
    batch = BatchMaker(packed_model).packed(samples, pad=6)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append((kw.get("is_causal"), a[0].shape[-2]))
        return sdpa(*a, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        a = packed_model(batch)["loss"]
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    # one causal call per sample and one for the padding run, per layer (other calls: output projections)
    layers = packed_model.bundle.hf_model.config.num_hidden_layers
    lens = [len(s["ids"]) for s in samples] + [6]
    assert [n for causal, n in calls if causal] == lens * layers
    b = dense_model(batch)["loss"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pa = [p for p in packed_model.parameters() if p.requires_grad]
    pb = [p for p in dense_model.parameters() if p.requires_grad]
    for ga, gb in zip(torch.autograd.grad(a, pa), torch.autograd.grad(b, pb)):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
