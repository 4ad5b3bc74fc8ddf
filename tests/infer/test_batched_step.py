"""``BatchedStepModel`` (the server's step model) on the real ``ToolLMM``: prefill of ragged prompts (one
with an image) and ragged appends of 0, 1, 2 and 7 tokens through the batched cache give the logits and
last hidden states of one full forward of each row alone, under every attention kernel on CPU."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import toollmm
from toollmm.infer.batched_step import BatchedStepModel
from toollmm.infer.requests import Request
from toollmm.infer.step import ToolLMMStepModel


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_cache_equals_each_row_alone(tiny_stage_dir, tmp_path, attn):
    rt = toollmm.load(
        tiny_stage_dir, output_dir=tmp_path, overrides=[f"model.llm.attn_implementation={attn}"]
    )
    img = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    reqs = [
        Request(messages=[{"role": "user", "content": "hi"}]),
        Request(
            messages=[{"role": "user", "content": "<image>\nwhat colour is this picture?"}], images=[str(img)]
        ),
        Request(messages=[{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 3}]),
    ]
    prompts = [rt.prompt(r) for r in reqs]
    media = [rt.media_inputs(r) for r in reqs]
    assert len({len(p) for p in prompts}) == 3 and "image" in media[1]
    batched, alone = BatchedStepModel(rt.model), ToolLMMStepModel(rt.model)
    state, out = batched.start(prompts, media)
    seqs = [list(p) for p in prompts]

    def reference(i):  # one fresh forward of row i's whole sequence
        _, ref = alone.start([seqs[i]], [media[i]])
        return ref.logits[0], ref.hidden[0]

    for i in range(3):
        lg, hs = reference(i)
        torch.testing.assert_close(out.logits[i], lg, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.hidden[i], hs, atol=1e-5, rtol=1e-5)
    for appends in ([[5], [6, 7], []], [[8, 9, 10, 11, 12, 13, 14], [], [15]], [[16], [17], [18, 19]]):
        out = batched.step(state, appends)
        for i, toks in enumerate(appends):
            if not toks:
                assert out.hidden[i] is None
                continue
            seqs[i] += toks
            lg, hs = reference(i)
            torch.testing.assert_close(out.logits[i], lg, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.hidden[i], hs[-len(toks) :], atol=1e-5, rtol=1e-5)
