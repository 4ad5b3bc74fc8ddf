"""Issue 16 item 6: ``--batch`` writes ``OUT.partial`` and renames it to ``OUT`` at the end, so a killed
batch leaves the previous ``OUT`` untouched and nothing that looks complete; ``--resume`` continues from
the last complete result and gives the same file as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from test_inference_cli import Loader, run


class Killed(Exception):
    """Stands for the process dying after N generate calls (injected into the real runtime)."""


class DyingLoader(Loader):
    """The real runtime, whose ``run_rows`` dies on call number ``die_at`` (1-based), after writing a torn
    half line into the partial file like a kill in the middle of a write would."""

    def __init__(self, die_at: int | None = None, partial=None):
        super().__init__()
        self.die_at, self.partial, self.groups = die_at, partial, 0

    def __call__(self, checkpoint, **kwargs):
        rt = super().__call__(checkpoint, **kwargs)
        inner = rt.run_rows

        def run_rows(reqs, **kw):
            self.groups += 1
            if self.groups == self.die_at:
                with open(self.partial, "a", encoding="utf-8") as f:
                    f.write('{"id": "torn", "text": "hal')
                raise Killed(f"killed before group {self.groups}")
            return inner(reqs, **kw)

        rt.run_rows = run_rows
        return rt


PROMPTS = ["what is 2 plus 3", "ask me about it", "please draw", "ask me again", "what is 2 plus 3"]


@pytest.fixture
def batch(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return src


def argv(stage, src, out, tmp_path, *extra, media="media"):
    return ["--checkpoint", stage, "--batch", src, "--out", out, "--batch-size", 2,
            "--output-dir", tmp_path / media, *extra]  # fmt: skip


def strip_timings(text: str) -> list[dict]:
    rows = [json.loads(x) for x in text.splitlines()]
    for r in rows:
        r.pop("timings")
        for c in r["tool_calls"]:
            c.pop("duration_s")
    return rows


def test_killed_batch_keeps_the_old_output_and_resume_finishes_it(tiny_stage_dir, tmp_path, capsys, batch):
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    out.write_text('{"id": "old result"}\n')
    with pytest.raises(Killed):
        run(argv(tiny_stage_dir, batch, out, tmp_path), capsys, DyingLoader(die_at=2, partial=partial))
    assert out.read_text() == '{"id": "old result"}\n'  # the previous file is intact
    lines = partial.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines[:2]] == ["q0", "q1"] and lines[2].startswith('{"id": "torn"')

    resumed = DyingLoader()
    rc, _, err = run(argv(tiny_stage_dir, batch, out, tmp_path, "--resume"), capsys, resumed)
    assert rc == 0 and "2 of 5 results already" in err and not partial.exists()
    assert [t for t, _ in resumed.seen] and len(resumed.seen) == 3  # only the three missing requests ran
    got = out.read_text()
    assert [r["id"] for r in map(json.loads, got.splitlines())] == [f"q{i}" for i in range(5)]

    fresh_out = tmp_path / "fresh.jsonl"
    rc, _, _ = run(argv(tiny_stage_dir, batch, fresh_out, tmp_path, media="fresh"), capsys, DyingLoader())
    fresh = fresh_out.read_text().replace(str(tmp_path / "fresh"), str(tmp_path / "media"))
    assert rc == 0 and strip_timings(got) == strip_timings(fresh)  # same results as one uninterrupted run


def test_resume_refuses_a_partial_file_of_another_batch(tiny_stage_dir, tmp_path, capsys, batch):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text(json.dumps({"id": "other", "text": ""}) + "\n")
    loader = DyingLoader()
    rc, _, err = run(argv(tiny_stage_dir, batch, out, tmp_path, "--resume"), capsys, loader)
    assert rc == 2 and "out.jsonl.partial:1" in err and "another batch" in err and not out.exists()


def test_without_resume_a_stale_partial_is_started_over(tiny_stage_dir, tmp_path, capsys, batch):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text("garbage\n")
    rc, _, _ = run(argv(tiny_stage_dir, batch, out, tmp_path), capsys, DyingLoader())
    assert rc == 0 and len(out.read_text().splitlines()) == 5
