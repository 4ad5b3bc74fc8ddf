"""Resume checkpoints under ``outputs/<run>/stage_N/ckpt/``, written atomically.

Layout: ``ckpt/step_00000120/`` (DeepSpeed's own files: the TRAINED parameters only -- frozen base
weights are rebuilt from their checkpoints, so a 7B run does not rewrite 13 GB per save -- optimiser
and scheduler) plus ``rank{r}_state.pt`` per rank (step, RNG states, data position), and ``ckpt/latest``
naming the newest COMPLETE tag. A save goes to ``step_X.partial/`` first; only when every rank has
finished does rank 0 rename it and replace ``latest`` (os.replace), so a run killed mid-save leaves the
previous checkpoint intact. Stale ``.partial`` folders are removed; the last ``keep_last`` are kept.
Like DeepSpeed's own checkpoints, this assumes every node sees the run folder (a shared filesystem).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResumeCheckpoints:
    def __init__(self, ckpt_dir: Path, rank: int, local_rank: int, keep_last: int = 2):
        self.dir = Path(ckpt_dir)
        self.rank, self.local_rank, self.keep_last = rank, local_rank, max(1, keep_last)
        self.leader = rank == 0  # renames and prunes on the shared filesystem

    # ------------------------------------------------------------------ reading
    def latest(self) -> str | None:
        f = self.dir / "latest"
        if not f.exists():
            return None
        tag = f.read_text().strip()
        if not (self.dir / tag).is_dir():
            raise FileNotFoundError(
                f"{f} names {tag!r}, which is missing: the resume folder was edited by hand"
            )
        return tag

    def load(self, engine, tag: str | None = None) -> dict:
        """Restore DeepSpeed state and this rank's step/RNG/data state; returns that state."""
        tag = tag or self.latest()
        if tag is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.dir}")
        load_path, _ = engine.load_checkpoint(
            str(self.dir),
            tag=tag,
            load_module_strict=False,  # frozen parameters are not in the checkpoint
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {self.dir / tag}")
        state_file = self.dir / tag / f"rank{self.rank}_state.pt"
        if not state_file.exists():
            raise FileNotFoundError(
                f"{state_file} missing: was the run resumed with a different number of ranks?"
            )
        state = torch.load(state_file, map_location="cpu", weights_only=False)  # our own file: RNG tuples
        set_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", self.dir / tag, state["step"])
        return state

    # ------------------------------------------------------------------ writing
    def save(self, engine, step: int, extra: dict) -> Path:
        tag = f"step_{step:08d}"
        partial = f"{tag}.partial"
        if self.leader:
            shutil.rmtree(self.dir / partial, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=partial, save_latest=False, exclude_frozen_parameters=True)
        state = {"step": step, "rng": rng_state(), **extra}
        tmp = self.dir / partial / f".rank{self.rank}_state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.dir / partial / f"rank{self.rank}_state.pt")
        _barrier()
        if self.leader:
            final = self.dir / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.dir / partial, final)
            write_text_atomic(self.dir / "latest", tag)
            self._prune(keep=tag)
        _barrier()
        return self.dir / tag

    def _prune(self, keep: str) -> None:
        tags = sorted(
            p.name for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")
        )
        for old in tags[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        for stale in self.dir.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
