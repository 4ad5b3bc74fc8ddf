"""The step protocol on a real KV cache: a tiny Llama behind ``CausalLMStepModel``.

Ragged appends through the cache give the same logits and hidden states as one full forward, and the
engine's greedy decode equals ``transformers``' own ``generate``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from toollmm.agent.engine import Engine
from toollmm.agent.hf_step import CausalLMStepModel
from toollmm.agent.registry import Registry
from toollmm.core.config import InferenceConfig
from toollmm.core.tokens import TokenContract


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    TokenContract().add_to(t)
    return t


@pytest.fixture(scope="module")
def llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def test_ragged_appends_through_the_cache_match_a_full_forward(tok, llama):
    model = CausalLMStepModel(llama)
    a, b = tok.encode("USER: hi ASSISTANT:"), tok.encode("a red circle")
    state, out = model.start([a, b])
    appends = [[[11], [12, 13, 14]], [[], [15]], [[16, 17], []]]
    seqs = [list(a), list(b)]
    for step in appends:
        out = model.step(state, step)
        for i, toks in enumerate(step):
            if not toks:
                assert out.hidden[i] is None
                continue
            seqs[i] += toks
            with torch.no_grad():
                full = llama(input_ids=torch.tensor([seqs[i]]), output_hidden_states=True)
            torch.testing.assert_close(out.logits[i], full.logits[0, -1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                out.hidden[i], full.hidden_states[-1][0, -len(toks) :], atol=1e-5, rtol=1e-4
            )


class _Suppressed(CausalLMStepModel):
    """The same model with some ids never chosen (what ``generate(suppress_tokens=...)`` does)."""

    def __init__(self, model, ids):
        super().__init__(model)
        self.ids = ids

    def start(self, prompts, media=None):
        state, out = super().start(prompts, media)
        out.logits[:, self.ids] = float("-inf")
        return state, out

    def step(self, state, tokens):
        out = super().step(state, tokens)
        out.logits[:, self.ids] = float("-inf")
        return out


def test_engine_greedy_decode_equals_transformers_generate(tok, llama, tmp_path):
    banned = TokenContract().ids(tok).new_ids + [tok.eos_token_id]
    prompt = tok.encode("USER: what is in the picture? ASSISTANT:")
    eng = Engine(_Suppressed(llama, banned), tok, Registry(tmp_path), InferenceConfig(max_new_tokens=12))
    [res] = eng.generate([prompt])
    with torch.no_grad():
        ref = llama.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            suppress_tokens=banned,
            pad_token_id=tok.eos_token_id,
        )
    assert res.token_ids == ref[0, len(prompt) :].tolist()
    assert res.finish_reason == "max_new_tokens" and res.timings["model_s"] > 0
