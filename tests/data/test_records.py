"""One owner for the record: one validator, one reason vocabulary from validator to stream, one definition
of MEDIA_KEYS and MODALITIES, and no command-line parsing in the data library."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from toollmm.core.paths import REPO_ROOT
from toollmm.core.tokens import MODALITIES, TokenContract
from toollmm.data.pipeline import SampleProcessor
from toollmm.data.records import (
    REASONS,
    BadSample,
    Problem,
    Sample,
    check_record,
    ensure_trainable,
    load_jsonl,
)
from toollmm.data.render import Renderer

PACKAGE = REPO_ROOT / "code" / "toollmm"


def record(rid: str, messages: list[dict]) -> dict:
    return {"id": rid, "source": "test", "messages": messages}


def test_reasons_outside_the_vocabulary_are_refused():
    for old in ("placeholders", "no_supervised_turn", "json", "schema"):  # the two old vocabularies' names
        with pytest.raises(ValueError, match="unknown bad-input reason"):
            Problem(old, "x")
        with pytest.raises(ValueError, match="unknown bad-input reason"):
            BadSample(old, "f.jsonl:1", "x")
    assert len(set(REASONS)) == len(REASONS)


def test_validator_loader_and_stream_count_one_reason(tmp_path):
    """A role error is `roles` for check_record, load_jsonl's skip counter and the stream's BadSample."""
    bad = record("r", [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}])
    assert {p.reason for p in check_record(bad)} == {"roles"}
    with pytest.raises(BadSample, match=r"^f\.jsonl:3 \(id=r\): roles: messages\[0\] \(assistant\)") as e:
        ensure_trainable(bad, "f.jsonl:3 (id=r)")
    assert e.value.reason == "roles"
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(bad) + "\n")
    records = load_jsonl(p, on_error="skip")
    assert list(records) == [] and dict(records.skipped) == {"roles": 1}
    # a misspelt key is reported as missing too, but counts as unknown (as the stream always did)
    typo = {"id": "t", "source": "test", "mesages": []}
    assert {p.reason for p in check_record(typo)} == {"unknown_key"}
    assert {p.reason for p in check_record(record("e", []))} == {"empty_conversation"}


def test_renderer_reasons_reach_the_stream_unchanged(tiny_tokenizer_dir):
    """The real renderer's RecordError keeps its reason through SampleProcessor (no translation table)."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    TokenContract().add_to(tok)
    renderer = Renderer(tok)

    def no_media(*_):
        raise AssertionError("these records have no media")

    processor = SampleProcessor(
        renderer.render, TokenContract().ids(tok), dict.fromkeys(MODALITIES, 1), 4096, no_media
    )
    eos = tok.eos_token  # the tokenizer's own special token: only the renderer knows it
    rec = record("s", [{"role": "user", "content": f"say {eos}"}, {"role": "assistant", "content": "ok"}])
    assert check_record(rec) == []
    with pytest.raises(BadSample, match=r"^f\.jsonl:2 \(id=s\): forbidden_token: cannot render: ") as e:
        processor(Sample(rec, "f.jsonl:2 (id=s)", "test"))
    assert e.value.reason == "forbidden_token"
    good = record("g", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    out = processor(Sample(good, "f.jsonl:1 (id=g)", "test"))
    assert out.id == "g" and len(out) > 0


def _module_assignments(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _is_demo(rel: str) -> bool:
    """Demo code (fp-demo moves it into toollmm/demo/): data/demo/, data/demo_corpus.py, eval/demo*.py."""
    *folders, name = rel.split("/")
    return "demo" in folders or name.startswith("demo")


def _definitions(name: str, skip_demo: bool) -> list[str]:
    out = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE).as_posix()
        if skip_demo and _is_demo(rel):
            continue
        if name in _module_assignments(f):
            out.append(rel)
    return out


def test_media_keys_and_modalities_have_one_definition():
    assert _definitions("MEDIA_KEYS", skip_demo=False) == ["data/records.py"]
    assert _definitions("MODALITIES", skip_demo=False) == ["core/tokens.py"]


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in ``path`` (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            out.add("." * node.level + mod)
            out |= {"." * node.level + (f"{mod}." if mod else "") + a.name for a in node.names}
    return out


def test_data_library_parses_no_command_line_and_sources_shards_form_no_circle():
    for f in sorted((PACKAGE / "data").rglob("*.py")):
        if _is_demo(f.relative_to(PACKAGE).as_posix()):
            continue  # the demo corpus's own options move with it (fp-demo)
        assert "argparse" not in _imports(f), f"{f}: command-line parsing belongs in code/*.py"
    assert not {".sources", ".sources.JsonlSource"} & _imports(PACKAGE / "data" / "shards.py")
