"""The LLM side: loading, dtype policy, new token rows (init, only they train), checkpointing with LoRA."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model_fixtures import BatchMaker, build_tiny, mixed_samples, write_tiny_llama
from toollmm.core.config import LLMConfig, OptimConfig, TokenConfig
from toollmm.core.tokens import TokenContract
from toollmm.model.llm import build_llm, enable_gradient_checkpointing, resolve_dtype


@pytest.fixture(scope="module")
def llm_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tied_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama_tied"), tied=True)


def test_dtype_policy():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16 and resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8")


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_llm(LLMConfig(path=str(tmp_path / "nope")), TokenConfig())


def test_load_adds_contract_and_inits_new_rows_at_mean_plus_seeded_noise(llm_dir):
    original = load_file(str(llm_dir / "model.safetensors"))
    base_e, base_h = original["model.embed_tokens.weight"], original["lm_head.weight"]
    v = base_e.shape[0]
    cfg = LLMConfig(path=str(llm_dir), attn_implementation="eager")
    b = build_llm(cfg, TokenConfig(init_noise_std=0.02, init_seed=3))
    assert b.hf_model.config._attn_implementation == "eager" and b.hf_model.dtype == torch.float32
    assert b.token_ids.new_ids == list(range(v, v + len(TokenContract().new_tokens)))
    assert b.hf_model.config.vocab_size == v + 43 and not b.tied
    for rows, base in ((b.rows["embed"], base_e), (b.rows["head"], base_h)):
        new = rows.matrix().detach()
        std, mean = torch.std_mean(base, dim=0)
        dev = (new - mean) / std  # noise in units of the per-dim std: ~N(0, 0.02^2)
        assert dev.abs().max() < 0.2 and 0.01 < dev.std() < 0.03
    emb = b.hf_model.get_input_embeddings()
    assert torch.equal(emb.weight[:v], base_e)  # loaded rows untouched
    again = build_llm(cfg, TokenConfig(init_noise_std=0.02, init_seed=3))
    other = build_llm(cfg, TokenConfig(init_noise_std=0.02, init_seed=4))
    assert torch.equal(again.rows["head"].matrix(), b.rows["head"].matrix())
    assert not torch.equal(other.rows["head"].matrix(), b.rows["head"].matrix())
    assert all(not p.requires_grad for p in b.model.parameters())  # everything frozen until told


def _effective(model):
    """(embedding matrix as the model sees it, lm_head matrix as the model sees it)."""
    hf = model.bundle.hf_model
    emb = hf.get_input_embeddings()
    v, h = emb.weight.shape
    with torch.no_grad():
        e = emb(torch.arange(v))
        w = hf.get_output_embeddings()(torch.eye(h)).T
    return e.clone(), w.clone()


@pytest.mark.parametrize("variant", ["untied+lora", "tied+lora", "untied+no-lora"])
def test_only_new_signal_and_tool_rows_train(variant, llm_dir, tied_dir):
    model = build_tiny(tied_dir if variant.startswith("tied") else llm_dir, lora="no-lora" not in variant)
    ids = model.bundle.token_ids
    model.trainable_parameters(["token_rows.signal", "token_rows.tool"])
    e0, h0 = _effective(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.param_groups(OptimConfig(lr=1e-2, weight_decay=0.1)))
    maker = BatchMaker(model)
    batch = maker.batch(mixed_samples(maker))
    for _ in range(3):
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    e1, h1 = _effective(model)
    base = [i for i in range(e0.shape[0]) if i not in set(ids.new_ids)]
    assert torch.equal(e1[base], e0[base]) and torch.equal(h1[base], h0[base])  # bit-identical base rows
    for g in ("signal", "tool"):
        for i in ids.group_ids(g):  # every trained row moved, in both matrices
            assert not torch.equal(e1[i], e0[i]) and not torch.equal(h1[i], h0[i]), (g, i)
    ph = ids.group_ids("placeholder")
    assert torch.equal(e1[ph], e0[ph]) and torch.equal(h1[ph], h0[ph])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, w0[n])}
    assert changed and all(".token_rows.rows." in n for n in changed)
    assert (variant.startswith("tied")) == model.bundle.tied
    assert len(changed) == (2 if model.bundle.tied else 4)  # signal + tool, per matrix


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_reaches_lora(use_reentrant, llm_dir):
    plain = build_tiny(llm_dir, seed=1)
    ckpt = build_tiny(llm_dir, seed=1, grad_ckpt=not use_reentrant)  # the config path: non-reentrant
    if use_reentrant:  # reentrant checkpoints need the checkpointed inputs to require grad
        enable_gradient_checkpointing(ckpt.bundle.hf_model, use_reentrant=True)
    grads = []
    for model in (plain, ckpt):
        model.trainable_parameters(["lora"])  # frozen embedding, frozen projections: only LoRA trains
        with torch.no_grad():  # B = 0 at init would hide A's gradient; give B a value
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(n) % 1000))
        model.train()
        calls = []
        # a pre-hook inside the checkpointed forward (the recompute stops early, so no post-hook on
        # late submodules, and layer hooks stay outside the checkpoint)
        # (on the attention module: the fused training forward computes q/k/v without calling q_proj)
        q = model.bundle.hf_model.model.layers[0].self_attn
        hook = q.register_forward_pre_hook(lambda *a, c=calls: c.append(1))
        maker = BatchMaker(model)
        model(maker.batch(mixed_samples(maker)))["loss"].backward()
        hook.remove()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert len(calls) == (2 if model is ckpt else 1)  # the checkpointed layer ran again in backward
    assert grads[1] and all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for n, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][n], atol=1e-6, rtol=1e-4)


def test_padded_vocabulary_reuses_spare_rows(tiny_tokenizer_dir, tmp_path):
    """A model with more rows than tokens (padded vocab): the new ids land inside; no resize."""
    d = write_tiny_llama(tiny_tokenizer_dir, tmp_path / "padded", vocab_pad=64)
    original = load_file(str(d / "model.safetensors"))["model.embed_tokens.weight"]
    b = build_llm(LLMConfig(path=str(d)), TokenConfig())
    emb = b.hf_model.get_input_embeddings()
    assert emb.weight.shape == original.shape and max(b.token_ids.new_ids) < original.shape[0]
    new = b.token_ids.new_ids
    assert torch.equal(emb.weight[: new[0]], original[: new[0]])
    with torch.no_grad():
        looked_up = emb(torch.tensor(new))
    assert torch.equal(looked_up, b.rows["embed"].matrix())  # the spare rows were re-initialised
    assert not torch.equal(looked_up, original[new])
