"""``model.llm.fused_kernels`` (toollmm.model.kernels): off by default; refused with an error naming it where it
cannot run (this CPU machine); the matrix its fused loss multiplies is exactly the LM head ToolLMM uses. The
kernels themselves run on a GPU host only (``scripts/gpu_check.sh``'s ``fused_kernels`` section)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from model_fixtures import BatchMaker, build_tiny, mixed_samples, tiny_config, write_tiny_llama
from toollmm.core.config import LLMConfig, LoraSettings, TokenConfig, load_config
from toollmm.core.errors import UserError
from toollmm.model import kernels
from toollmm.model.llm import prepare_llm
from toollmm.model.losses import lm_loss_at, next_token_targets
from toollmm.model.toollmm_model import build_model

LIGER = importlib.util.find_spec("liger_kernel") is not None


@pytest.fixture(scope="module")
def llm_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


def test_fused_kernels_is_off_by_default():
    assert LLMConfig().fused_kernels is False
    assert load_config().config.model.llm.fused_kernels is False
    assert load_config(stage=3).config.model.llm.fused_kernels is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal: this host has CUDA")
def test_fused_kernels_on_cpu_is_refused_naming_the_option(llm_dir, tiny_tokenizer_dir):
    cfg = tiny_config(llm_dir)
    cfg.llm.fused_kernels = True
    with pytest.raises(UserError, match=r"model\.llm\.fused_kernels.*CUDA"):
        build_model(cfg, condition_shapes={})  # the real build path: build_llm, before loading weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(llm_dir))
    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    with pytest.raises(UserError, match=r"model\.llm\.fused_kernels.*CUDA"):
        prepare_llm(hf, tok, TokenConfig(), LoraSettings(), fused_projections=True, fused_kernels=True)


def test_fused_kernels_without_the_package_or_the_fused_projections_is_refused(llm_dir, monkeypatch):
    """On a CUDA host: the package must be importable (this environment never installs it), and the fused
    projections must be on (liger's RoPE and SwiGLU run inside their forward)."""
    if LIGER:
        assert kernels.unavailable(cuda=True) is None
    else:
        with pytest.raises(UserError, match=r"model\.llm\.fused_kernels.*liger-kernel"):
            kernels.require_fused_kernels(cuda=True)
    monkeypatch.setattr(kernels, "unavailable", lambda cuda=None: None)  # as on a CUDA host with the package
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(llm_dir))
    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    with pytest.raises(UserError, match=r"model\.llm\.fused_kernels needs model\.llm\.fused_projections"):
        prepare_llm(hf, tok, TokenConfig(), LoraSettings(), fused_projections=False, fused_kernels=True)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_fused_loss_matrix_is_the_lm_head_toollmm_uses(tiny_tokenizer_dir, tmp_path, tied):
    """``head_matrix`` (what liger's fused cross-entropy multiplies) gives the RowLMHead's logits, new-token
    columns from the trainable rows included, and the same gradients to those rows and the hidden states:
    the loss over it equals ``lm_loss_at(head(h))`` at the supervised positions of a real packed batch."""
    model = build_tiny(write_tiny_llama(tiny_tokenizer_dir, tmp_path / "llama", tied=tied))
    model.trainable_parameters(["token_rows.signal", "token_rows.tool"])
    head = model.llm.get_output_embeddings()
    rows = head.token_rows
    with torch.no_grad():  # trained rows differ from the frozen matrix's copies
        for p in rows.rows.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    maker = BatchMaker(model)
    batch = maker.packed(mixed_samples(maker), pad=3)
    with torch.no_grad():
        hidden = model.run_llm(batch).hidden_states[-1]
    keep, targets = next_token_targets(batch.labels, batch.position_ids == 0)
    assert targets.numel() > 0 and bool(torch.isin(targets, rows.ids).any())  # new tokens are predicted
    h1 = hidden[keep].clone().requires_grad_(True)
    h2 = hidden[keep].clone().requires_grad_(True)
    weight, bias = kernels.head_matrix(head)
    torch.testing.assert_close(F.linear(h1, weight, bias), head(h1), atol=1e-6, rtol=1e-6)
    trained = [p for p in rows.rows.values() if p.requires_grad]
    assert len(trained) == 2  # signal and tool rows
    fused = F.cross_entropy(F.linear(h1, weight, bias).float(), targets, reduction="mean")
    unfused = lm_loss_at(head(h2), targets)
    torch.testing.assert_close(fused, unfused)
    g1 = torch.autograd.grad(fused, [h1, *trained])
    g2 = torch.autograd.grad(unfused, [h2, *trained])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in g1[1:])  # the rows do receive gradient through the matrix


def test_fused_loss_without_supervised_tokens_is_an_exact_zero_with_a_graph(llm_dir):
    model = build_tiny(llm_dir)
    head = model.llm.get_output_embeddings()
    h = torch.zeros(0, head.in_features, requires_grad=True)
    loss = kernels.fused_lm_loss(h, head, torch.zeros(0, dtype=torch.long))  # never reaches liger
    assert loss.item() == 0.0 and loss.requires_grad


def test_the_fused_loss_is_not_taken_off_cuda(llm_dir):
    """A bundle with the flag on (as after a GPU build) whose tensors are on the CPU keeps the unfused loss:
    a CPU tensor never reaches a Triton kernel."""
    model = build_tiny(llm_dir)
    maker = BatchMaker(model)
    batch = maker.packed(mixed_samples(maker))
    model.train()
    want = model(batch)["lm"]
    model.bundle.fused_kernels = True
    assert model._fused_loss_head() is None
    torch.testing.assert_close(model(batch)["lm"], want)


def test_a_stage_trained_with_fused_kernels_loads_for_inference_on_cpu(tiny_stage_dir):
    """The kernels are training-only: ``load_stage`` (evaluation) builds without them, so a stage whose saved
    config sets the option (trained on a GPU host) still loads here."""
    from toollmm.checkpoint.stage import load_stage

    loaded = load_stage(tiny_stage_dir, overrides=["model.llm.fused_kernels=true"])
    assert loaded.model.bundle.fused_kernels is False and not loaded.model.training
    assert not kernels.has_fused_kernels(loaded.model.llm)
