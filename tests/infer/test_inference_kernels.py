"""The runtime's answer does not depend on the attention kernel: ``toollmm.load`` on a tiny stage folder with
``sdpa`` and with ``eager`` gives the same output (apart from timings) for a tool call, plain chat and an
image signal span, and the same real logits at every step.

The tiny model is untrained, so only its FIRST tokens are scripted (the call, or ``[IMG0]``); everything
after — the tool result appended to the KV cache in one step, the engine's completion of the signal span,
the answer — runs through the real ``ToolLMMStepModel`` and is chosen greedily from its own logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import toollmm
from inference_fixtures import call_text
from toollmm.agent.protocol import StepOutput
from toollmm.infer.requests import prompt_request
from toollmm.infer.step import ToolLMMStepModel

KERNELS = ("sdpa", "eager")


class ScriptThenFree:
    """The real step model; the next token is forced by one-hot logits while ``script`` lasts (the same for
    every row), then the model's own logits decide. ``logits`` records the model's own logits per step."""

    max_append = None

    def __init__(self, inner: ToolLMMStepModel, script: list[int]):
        self.inner, self.script = inner, script
        self.logits: list[torch.Tensor] = []

    def _out(self, out: StepOutput) -> StepOutput:
        self.logits.append(out.logits.clone())
        if self.pos >= len(self.script):
            return out
        forced = torch.full_like(out.logits, -1e4)
        forced[:, self.script[self.pos]] = 0.0
        self.pos += 1
        return StepOutput(forced, out.hidden)

    def start(self, prompts, media=None):
        self.pos = 0
        state, out = self.inner.start(prompts, media)
        return state, self._out(out)

    def step(self, state, tokens):
        return self._out(self.inner.step(state, tokens))


def _answer(
    stage, out_dir: Path, kernel: str, text: str, script: str
) -> tuple[dict, list[torch.Tensor], int]:
    rt = toollmm.load(
        stage,
        output_dir=out_dir / kernel,
        overrides=[f"model.llm.attn_implementation={kernel}"],
    )
    assert rt.model.bundle.hf_model.config._attn_implementation != "sdpa"  # ours (packed) or eager
    ids = rt.tokenizer.encode(script, add_special_tokens=False)
    rt.cfg.inference.max_new_tokens = len(ids) + 12  # the script, then 12 tokens of the model's own
    model = ScriptThenFree(ToolLMMStepModel(rt.model), ids)
    rt.set_step_model(model)
    [out] = rt.run([prompt_request(text)])
    out.pop("timings")
    for c in out["tool_calls"]:
        c.pop("duration_s")
    for m in out["media"]:
        m["path"] = Path(m["path"]).name
    return out, model.logits, len(ids)


@pytest.mark.parametrize(
    "text,script",
    [
        ("what is 2 plus 3", call_text("calculator", '{"a": 2, "b": 3, "op": "add"}')),
        ("hello there", ""),
        ("draw a red circle", "[IMG0]"),
    ],
    ids=["tool_call", "chat", "signal"],
)
def test_runtime_answer_is_the_same_under_sdpa_and_eager(tiny_stage_dir, tmp_path, text, script):
    (a, la, n), (b, lb, _) = (_answer(tiny_stage_dir, tmp_path, k, text, script) for k in KERNELS)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    if script.startswith("<tool_call>"):  # the call ran and the model went on after its result
        assert a["tool_calls"][0]["result"] is not None and a["tool_calls"][0]["error"] is None
        assert len(la) >= n + 3  # start, the call's steps, the forced result, at least one free token
    if script == "[IMG0]":  # the engine completed the span in one append and decoded it
        assert [m["modality"] for m in a["media"]] == ["image"]
