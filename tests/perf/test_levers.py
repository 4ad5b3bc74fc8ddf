"""The lever A/B (toollmm.perf.levers) switches the variants it names on the real ToolLMM."""

from __future__ import annotations

import pytest

from model_fixtures import build_tiny, write_tiny_llama
from toollmm.model import fused
from toollmm.perf import levers


def test_variants_switch_the_fused_forward(tiny_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(fused.CONCAT, "cpu", False)
    model = build_tiny(write_tiny_llama(tiny_tokenizer_dir, tmp_path / "llm"), r=4, dropout=0.1)
    attn = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    levers._set(model, "unfused")
    assert not fused.is_fused(model)
    levers._set(model, "shared")
    assert fused.is_fused(model) and all(m._toollmm_shared for m in attn)
    levers._set(model, "fused_concat")
    assert fused.CONCAT["cpu"] and not any(m._toollmm_shared for m in attn)
    levers._set(model, "fused")
    assert fused.is_fused(model) and not fused.CONCAT["cpu"]
    with pytest.raises(ValueError, match="unknown lever variant"):
        levers.paired_levers(None, ["fused", "fast"], 1)
