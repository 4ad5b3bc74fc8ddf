"""The demo's tools registered through ``inference.tool_imports`` with real backends (their results are
byte for byte the corpus's tool messages), precedence between same-named tools, and model-side binding that
keeps a tool's own backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toollmm.agent.builtin import bind_model_hooks
from toollmm.agent.registry import Registry, ToolSpec
from toollmm.agent.toolsets import SETS, load_toolset, registry_from_config
from toollmm.core.config import InferenceConfig
from toollmm.demo.tools import TOOL_NAMES, tool_conversation

DEMO = "toollmm.demo.toolset"


def registry(tmp_path, sets, imports=(DEMO,)) -> Registry:
    return registry_from_config(InferenceConfig(tool_sets=list(sets), tool_imports=list(imports)), tmp_path / "ws")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_demo_tools_answer_exactly_what_the_corpus_shows(tmp_path, split):
    reg = registry(tmp_path, ["builtin"])
    for k, tool in enumerate(TOOL_NAMES):
        for i in range(4):
            msgs, _ = tool_conversation(tool, split, np.random.default_rng([k, i]))
            call = msgs[1]["tool_calls"][0]["function"]
            res = reg.call(call["name"], call["arguments"])
            assert res.error is None and res.result == msgs[2]["content"], (tool, call)


def test_demo_tool_errors_are_observations(tmp_path):
    reg = registry(tmp_path, [])
    assert (
        reg.call("calculator", {"a": 1, "b": 0, "op": "divide"}).error
        == "ValueError: calculator: division by zero"
    )
    assert reg.call("calculator", {"a": 1, "b": 2, "op": "pow"}).error.startswith("invalid arguments")
    assert reg.call("weather", {"city": "Paris"}).error.startswith("invalid arguments")
    assert {s.source for s in reg.specs()} == {"demo"} and len(reg) == len(TOOL_NAMES)
    assert "demo" not in SETS  # the product declares no demo set: the demo's tools come by tool_imports
    with pytest.raises(ValueError, match="unknown tool set 'demo' .known: builtin, gpt4tools") as e:
        load_toolset("demo")  # a stage folder saved before the move: the error says what to pass instead
    assert "inference.tool_imports=[toollmm.demo.toolset]" in str(e.value)
    assert (
        reg.get("generate_image").renders == "image"
    )  # the model's image decoder writes what its result names
    with pytest.raises(ValueError, match="renders must be one of"):
        ToolSpec("x", "d", renders="pdf")


def test_imported_tools_win_over_declared_sets_and_binding_keeps_own_backends(tmp_path):
    demo_first = registry(tmp_path / "a", ["builtin"])  # tool_imports register before the declared sets
    builtin_first = registry(tmp_path / "b", ["builtin"], imports=())
    assert (
        demo_first.get("generate_image").source == "demo"
        and builtin_first.get("generate_image").source == "builtin"
    )
    made = []

    def make(prompt: str) -> str:
        made.append(prompt)
        path = builtin_first.workspace.root / "out.png"
        path.write_bytes(b"png")
        return str(path)

    bound = bind_model_hooks(demo_first, generate={"image": make}, caption=lambda p: f"caption of {p}")
    assert "generate_image" not in bound and "caption" in bound  # the demo tool keeps its reference backend
    assert json.loads(demo_first.call("generate_image", {"prompt": "a red circle"}).result)["image"].endswith(
        ".png"
    )
    assert made == []
    bound = bind_model_hooks(builtin_first, generate={"image": make})
    assert "generate_image" in bound
    res = builtin_first.call("generate_image", {"prompt": "a red circle"})
    assert made == ["a red circle"] and res.error is None and res.result == "out.png"  # workspace-relative
