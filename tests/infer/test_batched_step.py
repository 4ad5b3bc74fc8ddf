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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_join_and_leave_a_running_batch(tiny_stage_dir, tmp_path, attn):
    """Continuous batching on the real ``ToolLMM``: rows prefilled into a running batch (a prompt longer
    than the batch's cache and a shorter one), then rows leaving it, keep every row's logits and hidden
    states equal to one full forward of that row alone, under every attention kernel on CPU."""
    rt = toollmm.load(
        tiny_stage_dir, output_dir=tmp_path, overrides=[f"model.llm.attn_implementation={attn}"]
    )
    texts = ["hi", "a longer opening question about rivers", "long " * 30, "ok"]
    prompts = [rt.prompt(Request(messages=[{"role": "user", "content": t}])) for t in texts]
    batched, alone = BatchedStepModel(rt.model), ToolLMMStepModel(rt.model)
    seqs = [list(p) for p in prompts]

    def check(rows, out, appended):
        for k, i in enumerate(rows):
            _, ref = alone.start([seqs[i]], [{}])
            torch.testing.assert_close(out.logits[k], ref.logits[0], atol=1e-5, rtol=1e-5)
            n = len(appended[k]) if appended is not None else len(seqs[i])
            torch.testing.assert_close(out.hidden[k], ref.hidden[0][-n:], atol=1e-5, rtol=1e-5)

    state, out = batched.start(prompts[:2], None)
    rows = [0, 1]
    check(rows, out, None)
    for appends in ([[5], [6, 7]], [[8], [9]]):
        out = batched.step(state, appends)
        for i, toks in zip(rows, appends):
            seqs[i] += toks
        check(rows, out, appends)
    assert len(prompts[2]) > state.mask.shape[1] > len(prompts[3])
    out = batched.join(state, prompts[2:], None)  # one longer than the cache so far, one shorter
    rows = [0, 1, 2, 3]
    check([2, 3], out, None)
    plans = ([[10], [11, 12, 13], [14], []], [[15], [16], [17, 18], [19]])
    for appends in plans:
        out = batched.step(state, appends)
        for i, toks in zip(rows, appends):
            seqs[i] += toks
        check([i for i, t in zip(rows, appends) if t], out, [t for t in appends if t])
    width = state.mask.shape[1]
    batched.leave(state, [1, 3])  # the longest row leaves: the columns only it used go too
    rows = [1, 3]
    assert state.mask.shape[1] < width and state.lengths == [len(seqs[1]), len(seqs[3])]
    assert all(layer.keys.shape[0] == 2 for layer in state.cache.layers)
    for appends in ([[20], [21, 22]], [[23], [24]]):
        out = batched.step(state, appends)
        for i, toks in zip(rows, appends):
            seqs[i] += toks
        check(rows, out, appends)
