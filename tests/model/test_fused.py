"""Fused projections (toollmm.model.fused): the same loss and gradients as the unfused peft path, on ToolLMM."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from model_fixtures import BatchMaker, build_tiny, mixed_samples, write_tiny_llama
from toollmm.core.config import LoraSettings, TokenConfig
from toollmm.core.errors import UserError
from toollmm.model import fused
from toollmm.model.llm import prepare_llm

PARTS = ["lora", "input_proj", "token_rows.signal", "token_rows.tool"]


@pytest.fixture(scope="module")
def llm_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


class RandMaskDropout(nn.Module):
    """The reference: ``nn.Dropout``'s semantics (keep with probability 1 - p, scale 1 / (1 - p)) drawing its
    mask as the fused path does (``torch.rand >= p``), so that both paths see the same masks."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        return torch.where(torch.rand_like(x) >= self.p, x, 0.0) / (1 - self.p)


def _pair(llm_dir, attn: str, dropout: float, grad_ckpt: bool = False):
    """(fused ToolLMM, unfused ToolLMM with reference dropout): same seed, same weights, training mode."""
    a = build_tiny(llm_dir, r=4, dropout=dropout, attn=attn, grad_ckpt=grad_ckpt)
    b = build_tiny(llm_dir, r=4, dropout=dropout, attn=attn, grad_ckpt=grad_ckpt)
    fused.unfuse(b)
    assert fused.is_fused(a) and not fused.is_fused(b)
    for m in (a, b):
        m.trainable_parameters(PARTS)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:  # peft starts B at zero: make the LoRA updates count
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape))
        m.train()
    if dropout:
        for mod in b.modules():
            if hasattr(mod, "lora_dropout"):
                for k in list(mod.lora_dropout):
                    mod.lora_dropout[k] = RandMaskDropout(dropout)
    return a, b


def _loss_and_grads(model, batch, seed: int):
    torch.manual_seed(seed)
    loss = model(batch)["loss"]
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize(
    "attn,dropout,grad_ckpt,concat",
    [
        ("sdpa", 0.0, False, False),
        ("sdpa", 0.1, False, False),
        ("eager", 0.1, False, False),
        ("sdpa", 0.1, True, False),
        ("sdpa", 0.1, True, True),
    ],
    ids=["sdpa-nodrop", "sdpa-drop", "eager-drop", "sdpa-drop-ckpt", "sdpa-drop-ckpt-concatenated"],
)
def test_fused_toollmm_matches_the_unfused_path(llm_dir, monkeypatch, attn, dropout, grad_ckpt, concat):
    monkeypatch.setitem(fused.CONCAT, "cpu", concat)  # concatenated q/k/v and gate/up: CUDA's default
    a, b = _pair(llm_dir, attn, dropout, grad_ckpt)
    calls = []
    real = fused.fused_linear
    monkeypatch.setattr(fused, "fused_linear", lambda *x, **k: calls.append(1) or real(*x, **k))
    maker = BatchMaker(a)
    samples = mixed_samples(maker)
    batch = maker.packed(samples, pad=5) if attn == "sdpa" else maker.batch(samples)
    la, ga = _loss_and_grads(a, batch, 11)
    layers = a.bundle.hf_model.config.num_hidden_layers
    assert len(calls) >= 4 * layers  # q/k/v, o, gate/up, down per layer (again when checkpoints recompute)
    n = len(calls)
    lb, gb = _loss_and_grads(b, batch, 11)
    assert len(calls) == n  # the unfused model never enters the fused path
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    if dropout:  # the masks matter: another seed gives another loss
        assert abs(_loss_and_grads(a, batch, 12)[0].item() - la.item()) > 1e-6


def test_fused_path_matches_plain_peft_without_dropout_and_in_eval(llm_dir):
    """No reference module at all: peft's own forward against the fused one (dropout 0), and evaluation mode
    takes the own forward (bit-identical)."""
    a = build_tiny(llm_dir, r=4, dropout=0.0)
    b = build_tiny(llm_dir, r=4, dropout=0.0)
    fused.unfuse(b)
    for m in (a, b):
        m.trainable_parameters(PARTS)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.03)
    maker = BatchMaker(a)
    batch = maker.packed(mixed_samples(maker))
    a.train(), b.train()
    la, ga = _loss_and_grads(a, batch, 0)
    lb, gb = _loss_and_grads(b, batch, 0)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(batch)["loss"], b(batch)["loss"])


def _qkv(dropout: float):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(24, 24, bias=False) for _ in range(3))

    torch.manual_seed(0)
    m = get_peft_model(
        Block(),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj"]),
    )
    inner = m.base_model.model
    for n, p in inner.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.1)
    return m, inner


@pytest.mark.parametrize("concat", [False, True], ids=["per-module", "concatenated"])
def test_fused_linear_equals_each_module_and_sees_weight_changes(monkeypatch, concat):
    monkeypatch.setitem(fused.CONCAT, "cpu", concat)
    m, inner = _qkv(0.0)
    m.train()
    x = torch.randn(2, 5, 24)
    mods = [inner.q_proj, inner.k_proj, inner.v_proj]
    for got, mod in zip(fused.fused_linear(mods, x, False), mods):
        torch.testing.assert_close(got, mod(x), atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # a changed base weight (a load, a merge) must not be served from the cache
        inner.k_proj.base_layer.weight.mul_(2)
    torch.testing.assert_close(fused.fused_linear(mods, x, False)[1], inner.k_proj(x), atol=1e-6, rtol=1e-5)
    m.merge_adapter()  # merged adapters: the base weight holds the update, nothing is added twice
    torch.testing.assert_close(fused.fused_linear(mods, x, False)[0], inner.q_proj(x), atol=1e-5, rtol=1e-5)


def test_shared_dropout_draws_one_mask_for_the_group():
    m, inner = _qkv(0.5)
    m.train()
    x = torch.randn(7, 24)
    mods = [inner.q_proj, inner.k_proj, inner.v_proj]
    torch.manual_seed(3)
    got = fused.fused_linear(mods, x, True)
    torch.manual_seed(3)
    keep = torch.rand_like(x) >= 0.5
    xm = torch.where(keep, x, 0.0) / 0.5
    for g, mod in zip(got, mods):
        want = mod.base_layer(x) + mod.lora_B["default"](mod.lora_A["default"](xm)) * mod.scaling["default"]
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(3)  # per-module masks (the default) are a different regulariser: other values
    per_module = fused.fused_linear(mods, x, False)
    assert not torch.allclose(per_module[1], got[1])


def test_fused_dropout_keeps_the_dropout_distribution():
    drop = nn.Dropout(0.1).train()
    x = torch.ones(400, 500)
    torch.manual_seed(0)
    xm, rescale = fused._mask_input(drop, x)
    kept = (xm != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.003 and rescale == pytest.approx(1 / 0.9)
    assert abs((xm * rescale).mean().item() - 1.0) < 0.004  # E[dropout(x)] = x
    assert fused._mask_input(drop.eval(), x)[0] is x


def test_unfusable_modules_fall_back_and_shared_dropout_needs_fusion(llm_dir):
    class Variant(nn.Linear):
        pass

    with pytest.raises(fused._Unfusable):
        fused._lora_parts(Variant(4, 4))
    w = nn.Linear(4, 4)
    w.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(fused._Unfusable, match="ZeRO-3"):
        fused.fused_linear([w, nn.Linear(4, 4)], torch.randn(2, 4), False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llm_dir))
    lora = LoraSettings(r=4, alpha=8, shared_dropout=True)
    with pytest.raises(UserError, match="shared_dropout"):
        prepare_llm(hf, hf_tokenizer(llm_dir), TokenConfig(), lora, fused_projections=False)


def hf_tokenizer(llm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llm_dir))
