"""The one tiny-model writer outside the demo (``toollmm.model.tiny.write_llm``) serves the tests, the demo and
the benchmarks' shapes; benchmark code gets the demo corpus through its entry point, never by importing it."""

from __future__ import annotations

import json

import pytest
import torch

from toollmm.model.tiny import TinyLlama, write_llm
from toollmm.perf.flops import LlamaShape
from toollmm.perf.world import demo_corpus, llama_dims


def test_write_llm_takes_the_benchmarks_shapes_padded_vocab_and_dtype(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    shape = LlamaShape(hidden=32, layers=2, intermediate=64, vocab=512, heads=4, kv_heads=2)
    out = write_llm(tmp_path / "llm", tiny_tokenizer_dir, llama_dims(shape), seed=3, dtype=torch.bfloat16)
    assert not (tmp_path / "llm.tmp").exists()  # written next to it, then renamed into place
    saved = json.loads((out / "config.json").read_text())
    assert (
        saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
        and saved["max_position_embeddings"] == 2048
    )
    model = LlamaForCausalLM.from_pretrained(out)
    assert LlamaShape.of(model.config) == shape  # vocabulary padded past the tokenizer
    assert len(AutoTokenizer.from_pretrained(out)) < shape.vocab
    assert torch.get_default_dtype() == torch.float32  # restored after the bf16 build
    first = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    again = write_llm(out, tiny_tokenizer_dir, llama_dims(shape), seed=3, dtype=torch.bfloat16)  # in place
    assert torch.equal(LlamaForCausalLM.from_pretrained(again).model.layers[0].self_attn.q_proj.weight, first)


def test_write_llm_default_vocabulary_is_the_tokenizers(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    shape = TinyLlama(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)  # fmt: skip
    out = write_llm(tmp_path / "llm", tiny_tokenizer_dir, shape)
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.vocab_size == len(AutoTokenizer.from_pretrained(out)) and cfg.hidden_size == 16
    assert cfg.dtype in (torch.float32, "float32")


def test_bench_demo_corpus_goes_through_the_entry_point_and_names_it_on_failure(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")  # not a corpus folder: the generator refuses to write
    with pytest.raises(
        RuntimeError, match=r"prepare_data\.py demo --output .* exited [12]:\n(.|\n)*refusing"
    ):
        demo_corpus(tmp_path, small=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
