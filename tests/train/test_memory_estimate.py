"""scripts/memory_estimate.py: the Llama closed form matches a real (meta-device) model, and table cells equal
the formula worked by hand from Vicuna-7B's published numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from entry_points import load_script
from toollmm.train import memory as mem

GiB = 2**30
VICUNA_7B_PARAMS = 6_738_415_616  # Llama-2-7B / Vicuna-7B v1.5, as published
NEW_ROWS = 43  # 3 placeholders + 36 signal tokens + 4 tool tokens


def _script():
    return load_script("scripts/memory_estimate.py", "memory_estimate")


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True)])
def test_llama_closed_form_matches_a_built_model(kv_heads, tied):
    cfg = {
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "tie_word_embeddings": tied,
    }
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    total, layer, embed = mem.llama_params(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert layer == sum(p.numel() for p in model.model.layers[0].parameters())
    assert embed == model.model.embed_tokens.weight.numel()


def test_vicuna_7b_table_cells_equal_the_hand_computed_formula(capsys):
    assert mem.llama_params(mem.VICUNA_7B)[0] == VICUNA_7B_PARAMS
    assert _script().main(["--gpus", "1", "8"]) == 0
    out = capsys.readouterr().out
    cells = {}
    for line in out.splitlines():
        parts = [c.strip() for c in line.strip("|").split("|")]
        if len(parts) == 6 and parts[0].isdigit():
            cells[(int(parts[0]), int(parts[3]))] = (float(parts[4]), float(parts[5]))

    P = VICUNA_7B_PARAMS + 2 * NEW_ROWS * 4096  # embedding and lm_head grow by the new rows
    V, h, L = 32000 + NEW_ROWS, 4096, 32
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096

    # stage 3, ZeRO-2, 8 GPUs: T from param_count's docstring, b x s = 8 x 2048 from config/stage_3.yaml
    T, b, s, n = 133_917_952, 8, 2048, 8
    z2 = 2 * P + 2 * T + 2 * T + 16 * T / n + 2 * b * s * h * L + 34 * b * s * h + 14 * b * s * V
    assert cells[(3, 2)][1] == round(z2 / GiB, 1)
    # stage 1, ZeRO-3, 1 and 8 GPUs: T = input projection only, 32 x 512
    T, b, s = 4_198_400, 32, 512
    act = 2 * b * s * h * L + 34 * b * s * h + 14 * b * s * V
    for col, n in enumerate((1, 8)):
        z3 = 2 * P / n + 2 * 2 * max(layer, V * h) + 2 * T / n + 2 * T + 16 * T / n + act
        assert cells[(1, 3)][col] == round(z3 / GiB, 1)
    assert "2 b s h L + 34 b s h" in out and "16 T / N" in out  # the formula is printed with the table
    assert cells[(3, 3)][1] < cells[(3, 2)][1]  # ZeRO-3 on 8 GPUs needs less than ZeRO-2
