"""Files we write respect the umask (issue 21, item 5): weight files were 0600 (``tempfile.mkstemp`` in the
atomic writer, safetensors' own writer) while everything else was 0644, so teammates on a shared
filesystem could not load a stage folder or a release. Checked under an unusual umask on the real
writers: the atomic writer (feature cache), the caption store, ``save_delta`` (delta + peft adapter)
of the model ``toollmm.load`` returns, and ``export_llm`` (the demo's stand-in LM, ``release --merge``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from toollmm.checkpoint.delta import save_delta
from toollmm.checkpoint.stage import export_llm, load_stage
from toollmm.core.files import atomic_write_bytes, current_umask, file_mode
from toollmm.data.captions import CaptionStore


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o027, 0o640)])
def test_atomic_writer_and_caption_store(tmp_path, mask, mode):
    before = current_umask()
    with umask(mask):
        assert current_umask() == mask and file_mode() == mode
        atomic_write_bytes(tmp_path / "cache" / "a.bin", b"x")
        CaptionStore(tmp_path / "captions").put("ab" * 32, np.zeros((1, 4), dtype=np.float32))
    assert set(_modes(tmp_path).values()) == {mode}
    assert current_umask() == before  # reading the umask does not change it


def test_delta_and_exported_llm_are_readable_by_the_group(tiny_stage_dir, tmp_path):
    stage = load_stage(tiny_stage_dir)
    with umask(0o002):
        save_delta(stage.model, tmp_path / "delta")
        export_llm(stage.model, tmp_path / "llm")
    delta = _modes(tmp_path / "delta")
    assert {"delta.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(
        delta
    )
    assert {k: oct(v) for k, v in delta.items() if v != 0o664} == {}
    llm = _modes(tmp_path / "llm")
    assert any(k.endswith(".safetensors") for k in llm)
    assert {k: oct(v) for k, v in llm.items() if v != 0o664} == {}


def test_the_stage_fixture_was_written_with_the_umask(tiny_stage_dir):
    """``save_stage`` (what training writes) under the session's umask: every file the same mode."""
    modes = _modes(Path(tiny_stage_dir))
    assert "delta.safetensors" in modes and "adapter/adapter_model.safetensors" in modes
    assert {k: oct(v) for k, v in modes.items() if v != file_mode()} == {}
