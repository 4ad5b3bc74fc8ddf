"""Tool registry and declared tool sets: exact upstream names/descriptions, user tools, a real CPU backend."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from toollmm.agent.builtin import bind_model_hooks
from toollmm.agent.registry import Registry, ToolSpec, schema_from_signature, tool
from toollmm.agent.toolsets import (
    SETS,
    declare_sets,
    gpt4tools_header,
    load_toolset,
    mllmtool_specs_from_records,
    registry_from_config,
    render_gpt4tools_prompt,
    render_tool_block,
    render_tool_names,
)
from toollmm.core.config import InferenceConfig

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "shared"  # verbatim copies of public records


@pytest.fixture()
def reg(tmp_path):
    r = Registry(tmp_path / "ws", timeout_s=20)
    declare_sets(r, SETS)
    return r


@tool(description="Add two integers.")
def add_ints(a: int, b: int = 1) -> int:
    return a + b


def test_declared_set_sizes_and_provenance(reg):
    gpt = load_toolset("gpt4tools")
    assert len(gpt) == 24  # 23 upstream classes; ImageEditing exposes Remove + Replace
    assert len({s.name for s in gpt}) == 24
    assert len(load_toolset("viotgpt")) == 11
    assert {s.source for s in load_toolset("mllmtool")} == {"mllmtool"}
    for name in SETS[1:]:
        data = json.loads(
            (Path(__file__).resolve().parents[2] / f"code/toollmm/agent/toolsets/{name}.json").read_text()
        )
        assert data["_provenance"], name
    # typos are kept: these are the names the data uses
    assert "Detect the Give Object" in reg and "Segment the given object" in reg
    assert "obeject for meThe input" in reg.get("Segment the given object").description
    assert all(not s.description.endswith(" ") for s in gpt)
    with pytest.raises(ValueError, match="unknown tool set 'nope'"):
        load_toolset("nope")


def test_gpt4tools_prompt_matches_released_data_byte_for_byte(reg):
    files = [
        "gpt4tools_format_train_samples_tyshiwo1_regenerated.json",
        "gpt4tools_val_seen_records_reconstructed.json",
    ]
    checked = 0
    for f in files:
        for rec in json.loads((SAMPLES / f).read_text()):
            ins = rec["instruction"]
            names = re.search(r"should be one of \[(.*?)\]\n", ins).group(1).split(", ")
            specs = [reg.get(n) for n in names]
            assert [s.name if s else None for s in specs] == names  # exact names, not aliases
            assert ins.startswith(gpt4tools_header(specs))  # prefix + tool block + format + suffix head
            assert "\n\n" + render_tool_block(specs) + "\n\n" in ins
            assert f"should be one of [{render_tool_names(specs)}]\n" in ins
            history = ins.split("Previous conversation:\n", 1)[1].split("\n\nNew input: ", 1)[0]
            rest = ins.split("\n\nNew input: ", 1)[1]
            user, scratch = (
                rest.split("\nGPT4Tools needs to use tools", 1)[0],
                rest.split("step by step.\n", 1)[1],
            )
            assert render_gpt4tools_prompt(specs, history, user, scratch) == ins
            checked += 1
    assert checked == 4


def test_gpt4tools_descriptions_match_the_raw_validation_excerpt(reg):
    raw = (SAMPLES / "gpt4tools_val_seen_excerpt_raw_tyshiwo1_test_res.txt").read_text()
    body = raw[raw.index("'''") :]
    body = re.sub(r" %(?=\n)", "", body)  # that author's annotation marks
    body = re.sub(r"\n[ \t]*", "", body).replace("\\n", "\n")  # physical line breaks are annotations
    lines = [ln[2:] for ln in body.split("\n") if ln.startswith("> ")]
    assert len(lines) == 16
    for ln in lines:
        name, desc = ln.split(": ", 1)
        assert reg.get(name) is not None and reg.get(name).description == desc, name


def test_viotgpt_and_mllmtool_sample_names_resolve(reg):
    viot = json.loads((SAMPLES / "viotgpt_test_samples.json").read_text())
    actions = set()
    for key, recs in viot.items():
        if key.startswith("_"):
            continue
        for r in recs:
            chains = r.get("chains", "")
            if isinstance(chains, str):
                actions |= set(re.findall(r"Action: (.+)", chains))
            else:
                actions |= {c["action"] for c in chains}
            if "action" in r:
                actions.add(r["action"])
    assert len(actions) == 10
    for a in actions:
        assert reg.get(a) is not None and reg.get(a).source == "viotgpt", a
    assert reg.get("Crowd Counting").name == "Count People in the Video"  # test-file name -> code name
    only = registry_from_config(
        InferenceConfig(tool_sets=["viotgpt"], tools=["Crowd Counting"]), reg.workspace.root
    )
    assert "no backend" in only.call("Count People in the Video", {"video_path": "video/a.mp4"}).error
    assert "not enabled" in only.call("Fire and Smoke Detection", {"video_path": "video/a.mp4"}).error
    recs = []
    for f in [
        "mllmtool_audio_tx2t_train_sample.json",
        "mllmtool_video_tx2t_train_sample.json",
        "mllmtool_combined_data_test_sample.json",
    ]:
        recs += json.loads((SAMPLES / f).read_text())
    specs = mllmtool_specs_from_records(recs)
    assert len(specs) >= 15 and "unknown" not in {s.name for s in specs}
    for s in specs:
        assert reg.get(s.name) is not None and reg.get(s.name).source == "mllmtool", s.name


def test_declared_tool_without_backend_answers_with_an_error(reg):
    r = reg.call("Predict Depth On Image", {"image_path": "a.png"})
    assert (
        r.result is None and "declared but has no backend" in r.error and r.name == "Predict Depth On Image"
    )
    assert r.observation().startswith("error: ")
    r = reg.call_text("Recognize the Vehicle Plate", "皖AX239T,video/Hefei.mp4")  # VIoT-Tool test-file name
    assert r.name == "Recognize the Vehicle by Plate Number" and "no backend" in r.error


def test_edge_detection_really_runs_and_names_output_like_gpt4tools(reg):
    ws = reg.workspace.root
    (ws / "image").mkdir()
    img = Image.new("RGB", (64, 48), "black")
    ImageDraw.Draw(img).rectangle([16, 12, 47, 35], fill="white")
    img.save(ws / "image" / "abc.png")
    r = reg.call_text("Edge Detection On Image", "image/abc.png")
    assert r.ok, r.error
    assert re.fullmatch(r"image/[0-9a-f]{8}\.png", r.result)  # same folder + uuid4()[:8] + .png
    out = Image.open(ws / r.result)
    assert out.mode == "RGB" and out.size == (64, 48)
    px = out.convert("L").load()
    assert px[16, 20] == 255 and px[47, 20] == 255  # the square's left/right boundary is an edge
    assert px[30, 24] == 0 and px[5, 5] == 0  # inside the square and the flat background are not
    assert set(np.unique(np.asarray(out.convert("L"))).tolist()) == {0, 255}  # binary, like Canny
    Image.new("RGB", (20, 10), (200, 200, 200)).save(ws / "flat.png")
    flat = reg.call_text("Edge Detection On Image", "flat.png")
    assert np.asarray(Image.open(ws / flat.result)).max() == 0  # a flat image has no edges, borders included


def test_user_tools_by_decorator_and_by_config_import(tmp_path):
    assert schema_from_signature(add_ints) == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    reg = Registry(tmp_path)
    reg.add(add_ints)
    r = reg.call("add_ints", {"a": 2, "b": 40})
    assert r.ok and r.result == "42"  # computed in a subprocess
    cfg = InferenceConfig(
        tool_sets=["builtin"], tool_imports=["test_agent_registry:add_ints"], tools=["add_ints"]
    )
    reg2 = registry_from_config(cfg, tmp_path)
    assert reg2.call("add_ints", {"a": 1}).result == "2"
    assert "not enabled" in reg2.call("caption", {"path": "x.png"}).error
    with pytest.raises(ImportError, match="no attribute 'missing'"):
        Registry(tmp_path).import_path("test_agent_registry:missing")
    with pytest.raises(ValueError, match="unknown tools"):
        registry_from_config(InferenceConfig(tool_sets=["builtin"], tools=["nope"]), tmp_path)

    @reg.tool(description="closure", isolation="inprocess")
    def shout(text: str) -> str:
        return text.upper()

    assert reg.call("shout", {"text": "hi"}).result == "HI"
    with pytest.raises(TypeError, match="module-level"):
        reg.add(tool(name="closure2")(lambda x: x))
    with pytest.raises(ValueError, match="already registered"):
        reg.add(add_ints)
    with pytest.raises(ValueError, match="output must be one of"):
        ToolSpec("x", "d", output="pdf")


def test_model_hooks_bind_builtins_and_gpt4tools_equivalents(reg):
    ws = reg.workspace.root
    (ws / "cat.png").write_bytes(b"not really an image")

    def gen_image(prompt):
        p = ws / f"gen_{len(prompt)}.png"
        p.write_bytes(b"png")
        return str(p)

    bound = bind_model_hooks(
        reg,
        caption=lambda p: f"caption of {Path(p).name}",
        answer=lambda p, q: f"{q[:5]}@{Path(p).name}",
        generate={"image": gen_image},
    )
    assert "Get Photo Description" in bound and "generate_image" in bound
    assert reg.call_text("Get Photo Description", "cat.png").result == "caption of cat.png"
    assert reg.call_text("Answer Question About The Image", "cat.png, what colour").result == "what @cat.png"
    assert reg.call("generate_image", {"prompt": "a red circle"}).result == "gen_12.png"  # workspace-relative
    assert reg.call("generate_video", {"prompt": "x"}).error.endswith("nothing was run")
