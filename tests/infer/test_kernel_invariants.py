"""One invariant, every attention kernel the config accepts, on the classes users run.

For each ``model.llm.attn_implementation`` (read from the config's type, so a new kernel cannot skip this
file): a packed batch of several rows gives each sample's logits alone, and prefill + appends of 1, 2 and 7
tokens through the real decode step model's KV cache give one full forward's logits and last hidden states
(``toollmm.infer.kernel_check.kernel_invariants``, the function the GPU check runs in bf16). flash-attn
cannot run on CPU: its two kernel functions are replaced by a plain-torch reference
(``tests/_flash_reference.py``) and the arguments they receive are checked too.
"""

from __future__ import annotations

import typing

import pytest
import torch

import _flash_reference
from model_fixtures import build_tiny, write_tiny_llama
from toollmm.core.config import LLMConfig
from toollmm.infer.kernel_check import APPENDS, kernel_invariants, packed_case
from toollmm.model import packed_attention

KERNELS = typing.get_args(typing.get_type_hints(LLMConfig)["attn_implementation"])
TOL = 2e-5  # float32 on CPU; the cases that were wrong differ by 0.1 .. 3


@pytest.fixture(scope="module")
def llm_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


def build(llm_dir, kernel, monkeypatch=None, **kw):
    """The composed model on ``kernel`` with LoRA switched on (non-zero B) so the adapter is on the path."""
    model = build_tiny(
        llm_dir, attn="eager" if kernel == "flash_attention_2" else kernel, tokens_per_input=2, **kw
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape))
    ref = None
    if kernel == "flash_attention_2":
        ref = _flash_reference.install(monkeypatch)
        _flash_reference.as_flash_attention_2(model)
    return model, ref


def test_every_config_kernel_is_covered():
    assert set(KERNELS) == {"sdpa", "eager", "flash_attention_2"}


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_rows_and_cache_appends_match_one_forward(llm_dir, kernel, monkeypatch):
    model, _ = build(llm_dir, kernel, monkeypatch)
    diffs = kernel_invariants(model)
    expected = {"packed_logits", "prefill_logits"} | {
        f"append_{n}_{what}" for n in APPENDS for what in ("logits", "hidden")
    }
    assert set(diffs) == expected
    bad = {k: v for k, v in diffs.items() if not v < TOL}
    assert not bad, f"{kernel}: {bad}"


def _expected_cu_seqlens(batch, lengths: dict[str, int]) -> list[int]:
    """Sample boundaries over the flattened rows, from the collator's own row layout (padding = one span)."""
    width, out = batch.input_ids.shape[1], []
    for r, ids in enumerate(batch.sample_ids):
        off = r * width
        for sid in ids:
            out.append(off)
            off += lengths[sid]
        if off < (r + 1) * width:
            out.append(off)
    return out + [len(batch.sample_ids) * width]


def test_flash_attention_2_gets_sample_boundaries_of_every_row(llm_dir, monkeypatch):
    """The packed batch reaches flash-attn's varlen kernel flattened, with cu_seqlens at every sample start
    of every row (transformers alone derives them from position_ids only for a single row)."""
    model, ref = build(llm_dir, "flash_attention_2", monkeypatch)
    samples, batch = packed_case(model)
    assert batch.input_ids.shape[0] >= 3
    with torch.no_grad():
        model.run_llm(batch)
    layers = model.bundle.hf_model.config.num_hidden_layers
    assert [c["fn"] for c in ref.calls] == ["varlen"] * layers
    cu = _expected_cu_seqlens(batch, {s.id: len(s) for s in samples})
    heads = model.bundle.hf_model.config.num_attention_heads
    for c in ref.calls:
        assert c["cu_seqlens_q"] == cu and c["cu_seqlens_k"] == cu
        assert c["cu_dtype"] == torch.int32 and c["causal"] is True
        assert c["max_seqlen_q"] == c["max_seqlen_k"] == max(b - a for a, b in zip(cu, cu[1:]))
        assert isinstance(c["max_seqlen_q"], int)
        assert c["q"][:2] == (batch.input_ids.numel(), heads)


def test_flash_attention_2_cache_appends_use_bottom_right_causal_kernel(llm_dir, monkeypatch):
    """Decode-time calls: the dense kernel with every cached key and the appended queries, causal."""
    from toollmm.infer.step import ToolLMMStepModel

    model, ref = build(llm_dir, "flash_attention_2", monkeypatch)
    step = ToolLMMStepModel(model)
    state, _ = step.start([[1, 5, 6, 7, 8]])
    ref.calls.clear()
    step.step(state, [[9, 10, 11]])
    assert {(c["fn"], c["q"][1], c["k"][1], c["causal"]) for c in ref.calls} == {("dense", 3, 8, True)}


def test_packed_spans_are_found_once_per_batch(llm_dir, monkeypatch):
    """Sample spans (a host sync) come from position_ids once per forward, not once per layer, and the
    recomputation of activation checkpointing reuses them."""
    model, _ = build(llm_dir, "sdpa", grad_ckpt=True)
    model.trainable_parameters(["lora"])
    model.train()
    samples, batch = packed_case(model)
    calls = []
    real = packed_attention.spans

    def counting(position_ids):
        calls.append(tuple(position_ids.shape))
        return real(position_ids)

    monkeypatch.setattr(packed_attention, "spans", counting)
    out = model.run_llm(batch, hidden_states=False)
    out.logits.float().square().mean().backward()
    assert calls == [tuple(batch.position_ids.shape)]


def test_max_abs_diff_never_reads_nan_as_agreement():
    from toollmm.infer.kernel_check import max_abs_diff

    a = torch.tensor([1.0, 2.0])
    assert max_abs_diff(a, a + 0.5) == 0.5
    assert max_abs_diff(a, torch.tensor([1.0, float("nan")])) == float("inf")
    assert max_abs_diff(a.bfloat16(), a) == 0.0
