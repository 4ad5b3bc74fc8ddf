"""Issue 21 item 4: a ``--batch`` line with a key we do not know (LLaVA's singular ``image``) is an error
naming the line and the right key, before the model loads; it never runs without its image."""

from __future__ import annotations

import json

import pytest
from test_inference_cli import Loader, run


@pytest.mark.parametrize(
    "line, hint",
    [
        ({"prompt": "describe it", "image": "red.png"}, "unknown key `image` (did you mean `images`?)"),
        ({"prompt": "x", "audio": ["a.wav"]}, "unknown key `audio` (did you mean `audios`?)"),
        ({"prompt": "x", "prompts": "y"}, "unknown key `prompts` (did you mean `prompt`?)"),
        ({"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, "unknown key `prompt`"),
        ({"query": "x"}, "unknown key `query` (did you mean `prompt`?)"),
    ],
)
def test_unknown_keys_name_the_line_and_the_right_key(tiny_stage_dir, tmp_path, capsys, line, hint):
    (tmp_path / "red.png").write_bytes(b"")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n' + json.dumps(line) + "\n", encoding="utf-8")
    loader = Loader()
    rc, _, err = run(
        ["--checkpoint", tiny_stage_dir, "--batch", src, "--out", tmp_path / "o.jsonl"], capsys, loader
    )
    assert rc == 2 and loader.calls == 0, err
    assert f"{src}:2: " in err and hint in err
    assert not (tmp_path / "o.jsonl").exists()


def test_known_keys_of_both_forms_still_run(tiny_stage_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "prompt": "ask me", "tools": None},
        {"id": "b", "source": "s", "task": "instruct", "meta": {"k": 1},
         "messages": [{"role": "user", "content": "ask me"}], "eval": {"reference": "x"}},
    ]  # fmt: skip
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    rc, _, err = run(
        [
            "--checkpoint",
            tiny_stage_dir,
            "--batch",
            src,
            "--out",
            tmp_path / "o.jsonl",
            "--output-dir",
            tmp_path,
        ],
        capsys,
        Loader(),
    )
    assert rc == 0, err
    assert [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["a", "b"]


def test_readme_documents_the_batch_format():
    from toollmm.core.paths import REPO_ROOT
    from toollmm.infer.requests import PROMPT_KEYS

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Inference") : readme.index("## Release")]
    assert "--batch" in section and '"images"' in section and "--resume" in section
    assert all(f"`{k}`" in section for k in PROMPT_KEYS)
