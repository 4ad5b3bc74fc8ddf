"""Real-scale readiness without a GPU: a Vicuna-7B-shaped model + LoRA + projections on the meta device;
per-stage trainable counts match the closed form of toollmm.model.param_count (and its stated numbers)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from toollmm.checkpoint.delta import HEADER_SLACK, delta_size_bound
from toollmm.core.config import ModelConfig, load_config
from toollmm.core.tokens import MODALITIES, TokenContract, TokenIds
from toollmm.model.llm import prepare_llm
from toollmm.model.param_count import input_proj_count, lora_count, output_proj_count, token_rows_count
from toollmm.model.toollmm_model import build_model

REAL_COND = {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)}  # SD v1.5, ZeroScope v2, AudioLDM
VICUNA_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)
STATED = {1: 4_198_400, 2: 96_132_352, 3: 133_917_952}  # the numbers in param_count's docstring


def _ids_after(vocab: int, contract: TokenContract) -> TokenIds:
    """The ids TokenContract.add_to gives on a 32000-token Vicuna tokenizer: appended in contract order."""
    ids = dict(zip(contract.new_tokens, range(vocab, vocab + len(contract.new_tokens))))
    return TokenIds(
        placeholder={m: ids[f"<{m}>"] for m in MODALITIES},
        signal={m: [ids[t] for t in contract.signal_tokens(m)] for m in MODALITIES},
        tool={t: ids[t] for t in contract.new_tokens[-4:]},
    )


@pytest.fixture(scope="module")
def meta_model():
    cfg = ModelConfig()  # the real defaults: r 32 q/k/v/o, linear 1024 -> H, NExT-GPT output projections
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**VICUNA_7B))
        contract = TokenContract.from_config(cfg.tokens)
        bundle = prepare_llm(hf, None, cfg.tokens, cfg.llm.lora, token_ids=_ids_after(32000, contract))
        model = build_model(cfg, llm=bundle, condition_shapes=REAL_COND)
    return cfg, model


def _formula(cfg: ModelConfig, names: list[str]) -> int:
    h, lora = VICUNA_7B["hidden_size"], cfg.llm.lora
    parts = {
        "lora": lora_count(h, 32, 32, 32, 11008, lora.r, lora.target_modules),
        "input_proj": input_proj_count(
            cfg.encoder.dims.out_embed_dim, h, cfg.input_proj.type, cfg.input_proj.tokens_per_input
        ),
        "token_rows.signal": token_rows_count(h, 4 + 24 + 8, tied=False),
        "token_rows.tool": token_rows_count(h, 4, tied=False),
    }
    for m, (q, c) in REAL_COND.items():
        o = cfg.output_proj[m]
        parts[f"output_proj.{m}"] = output_proj_count(
            h, q, c, o.d_model, o.dim_feedforward, o.num_encoder_layers, o.num_decoder_layers
        )
    return sum(parts[n] for n in names)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_vicuna7b_trainable_counts_per_stage_match_the_formula(stage, meta_model):
    cfg, model = meta_model
    names = load_config(stage=stage).config.train.trainable
    model.trainable_parameters(names)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == _formula(cfg, names) == STATED[stage]
    # everything stayed on the meta device: nothing real-scale was ever allocated
    assert all(p.is_meta for p in model.parameters())


def test_vicuna7b_shapes(meta_model):
    _, model = meta_model
    hf = model.bundle.hf_model
    assert hf.get_input_embeddings().weight.shape == (32043, 4096) and not model.bundle.tied
    assert {m: (p.n_query, p.cond_dim) for m, p in model.output_proj.items()} == REAL_COND
    assert sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n) == 8 * 32 * 32 * 4096
    # the frozen base (what a delta must never contain): about 6.74 B parameters
    frozen = sum(
        p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n and "token_rows" not in n
    )
    assert 6.7e9 < frozen < 6.8e9


def test_vicuna7b_stage3_delta_bound(meta_model):
    _, model = meta_model
    parts = [
        "input_proj",
        "lora",
        "token_rows.signal",
        "token_rows.tool",
        *(f"output_proj.{m}" for m in MODALITIES),
    ]
    n = STATED[3] + 3 * 2 * 4096  # + the frozen placeholder rows, saved so reloads are exact
    assert delta_size_bound(model, parts) == 4 * n + HEADER_SLACK  # fp32 here; 2 bytes/param in bf16
    assert 2 * n < 2 * 32000 * 4096 * 2  # bf16 delta < NExT-GPT's two bf16 embedding-matrix copies
