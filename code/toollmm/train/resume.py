"""Resume checkpoints under ``outputs/<run>/stage_N/ckpt/``, written atomically, loaded without pickle.

Layout: ``ckpt/step_00000120/`` (DeepSpeed's own files: the TRAINED parameters only -- frozen base
weights are rebuilt from their checkpoints, so a 7B run does not rewrite 13 GB per save -- optimiser
and scheduler) plus, per rank, ``rank{r}_state.json`` (step, data position, Python/NumPy RNG) and
``rank{r}_rng.safetensors`` (torch/CUDA RNG), and ``ckpt/latest`` naming the newest complete tag.

Nothing here runs code from the folder: our state is JSON + safetensors, and DeepSpeed's shards are
read through :class:`SafeCheckpointEngine` (``torch.load(weights_only=True)`` allowing only the few
DeepSpeed classes its optimiser state holds). A planted payload is refused naming the file.

A save goes to ``step_X.partial/``; when every rank has written, rank 0 marks it complete
(``complete.json``), moves an existing ``step_X/`` aside to ``step_X.old/``, renames the partial into
place, replaces ``latest`` (os.replace) and only then deletes the old folder. A kill between any two of
these leaves a complete checkpoint that :meth:`ResumeCheckpoints.latest` finds: ``latest`` when it names
a complete folder, else (with a warning) the newest complete one -- never a wedge. The next save puts a
complete leftover whose final folder is missing into place and removes the other ``.partial`` / ``.old``
folders; the last ``keep_last`` checkpoints are kept. Like DeepSpeed's own
checkpoints, this assumes every node sees the run folder (a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from toollmm.core.safefiles import safetensors_bytes, torch_load_weights

log = logging.getLogger(__name__)

STATE_FORMAT = "toollmm-resume/2"
COMPLETE = "complete.json"
_TAG = re.compile(r"^step_(\d{8})(\.partial|\.old)?$")
#: preference among folders of one step when ``latest`` is unusable: a complete partial is the newest
_RANK = {".partial": 2, "": 1, ".old": 0}


class ResumeError(ValueError):
    """A resume folder that cannot be used; names the file."""


# ------------------------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able part, tensors) of every RNG the training step draws from."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = plain["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state(
        (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(tensors["torch"])
    cuda = [
        tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------ DeepSpeed
def _deepspeed_allowed() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its optimiser shards (ZeRO-1/2/3, fp32/bf16/fp16):
    plain records whose construction runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_checkpoint_engine(config):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, but loading with ``torch.load(weights_only=True)``."""

        def load(self, path: str, map_location=None):
            return torch_load_weights(
                path, map_location=map_location, allowed=_deepspeed_allowed(), mmap=False
            )

    return SafeCheckpointEngine(config)


def install_safe_loader(engine) -> None:
    """Make every DeepSpeed checkpoint read of ``engine`` go through ``weights_only`` unpickling."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if engine.load_universal_checkpoint():
        raise ResumeError("DeepSpeed universal checkpoints are read with a full unpickler; not supported")
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine and type(current).__name__ != "SafeCheckpointEngine":
        raise ResumeError(
            f"DeepSpeed checkpoint engine {type(current).__name__} loads with a full unpickler; "
            "remove the `checkpoint` writer / datastates settings from the DeepSpeed JSON"
        )
    engine.checkpoint_engine = _safe_checkpoint_engine(engine._config)


# ------------------------------------------------------------------------------------- helpers
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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResumeCheckpoints:
    def __init__(self, ckpt_dir: Path, rank: int, local_rank: int, keep_last: int = 2):
        self.dir = Path(ckpt_dir)
        self.rank, self.local_rank, self.keep_last = rank, local_rank, max(1, keep_last)
        self.leader = rank == 0  # renames and prunes on the shared filesystem
        #: called with the name of each commit step just done ("complete", "aside", "in", "latest"):
        #: tests raise from it to stop a save between two steps, as a kill would
        self.after_commit_step: Callable[[str], None] = lambda step: None

    # ------------------------------------------------------------------ reading
    def _complete(self, name: str) -> bool:
        m = _TAG.match(name)
        if not m or not (self.dir / name).is_dir():
            return False
        return m.group(2) != ".partial" or (self.dir / name / COMPLETE).is_file()

    def complete_tags(self) -> list[str]:
        """Complete checkpoint folders, oldest first (for one step: ``.old``, final, complete ``.partial``)."""
        names = [p.name for p in self.dir.iterdir()] if self.dir.is_dir() else []
        found = [n for n in names if self._complete(n)]

        def order(n: str):
            m = _TAG.match(n)
            return int(m.group(1)), _RANK[m.group(2) or ""]

        return sorted(found, key=order)

    def latest(self) -> str | None:
        """The folder to resume from: the one ``latest`` names if it is complete, else the newest
        complete one (said out loud), else None."""
        f = self.dir / "latest"
        named = f.read_text(encoding="utf-8", errors="replace").strip() if f.is_file() else None
        if named is not None and self._complete(named):
            return named
        tags = self.complete_tags()
        if not tags:
            if named is not None and self.leader:
                log.warning("%s names %r, which is missing, and no complete checkpoint exists", f, named)
            return None
        if self.leader:
            problem = f"{f} names {named!r}, which is missing or incomplete" if named else f"{f} is missing"
            log.warning(
                "%s (a save was interrupted); using the newest complete checkpoint %s", problem, tags[-1]
            )
        return tags[-1]

    def load(self, engine, tag: str | None = None) -> dict:
        """Restore DeepSpeed state and this rank's step/RNG/data state; returns that state."""
        tag = tag or self.latest()
        if tag is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.dir}")
        folder = self.dir / tag
        plain, tensors = self._read_state(folder)  # before DeepSpeed: a bad folder fails fast
        install_safe_loader(engine)
        load_path, _ = engine.load_checkpoint(
            str(self.dir),
            tag=tag,
            load_module_strict=False,  # frozen parameters are not in the checkpoint
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {folder}")
        try:
            set_rng_state(plain["rng"], tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ResumeError(f"{folder / f'rank{self.rank}_state.json'}: bad RNG state ({e})") from None
        log.info("resumed from %s (step %d)", folder, plain["step"])
        return {k: v for k, v in plain.items() if k not in ("format", "rng")}

    def _read_state(self, folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        js, st = folder / f"rank{self.rank}_state.json", folder / f"rank{self.rank}_rng.safetensors"
        legacy = folder / f"rank{self.rank}_state.pt"
        if not js.is_file() and legacy.is_file():
            raise ResumeError(
                f"{legacy}: resume state in the old pickle format is not loaded (unpickling it could run "
                "code from the folder); start the stage again without --resume"
            )
        if not js.is_file() or not st.is_file():
            raise FileNotFoundError(
                f"{js if not js.is_file() else st} missing: was the run resumed with a different number of ranks?"
            )
        try:
            plain = json.loads(js.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResumeError(f"{js}: not valid JSON ({e})") from None
        if not isinstance(plain, dict) or plain.get("format") != STATE_FORMAT or "step" not in plain:
            raise ResumeError(f"{js}: not a {STATE_FORMAT} resume state")
        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError) as e:
            raise ResumeError(f"{st}: not a readable safetensors file ({e})") from None
        return plain, tensors

    # ------------------------------------------------------------------ writing
    def save(self, engine, step: int, extra: dict) -> Path:
        tag = f"step_{step:08d}"
        partial = self.dir / f"{tag}.partial"
        if self.leader:
            shutil.rmtree(partial, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(
            str(self.dir), tag=partial.name, save_latest=False, exclude_frozen_parameters=True
        )
        plain, tensors = rng_state()
        state = {"format": STATE_FORMAT, "step": step, "rng": plain, **extra}
        write_bytes_atomic(partial / f"rank{self.rank}_rng.safetensors", safetensors_bytes(tensors))
        write_text_atomic(partial / f"rank{self.rank}_state.json", json.dumps(state, sort_keys=True))
        _barrier()
        if self.leader:
            self._commit(tag)
        _barrier()
        return self.dir / tag

    def _commit(self, tag: str) -> None:
        partial, final, old = (self.dir / f"{tag}{s}" for s in (".partial", "", ".old"))
        write_text_atomic(partial / COMPLETE, json.dumps({"tag": tag}))
        self.after_commit_step("complete")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # left by an earlier interrupted save
            os.replace(final, old)
            self.after_commit_step("aside")
        os.replace(partial, final)
        self.after_commit_step("in")
        write_text_atomic(self.dir / "latest", tag)
        self.after_commit_step("latest")
        shutil.rmtree(old, ignore_errors=True)
        self._prune(keep=tag)

    def _prune(self, keep: str) -> None:
        """Promote a complete ``.partial`` (else ``.old``) whose final folder is missing (an interrupted
        save left it; a resume may have used it), delete the other leftovers, keep ``keep_last`` finals."""
        leftovers = [(m, p) for p in self.dir.iterdir() if (m := _TAG.match(p.name)) and m.group(2)]
        for m, p in sorted(leftovers, key=lambda mp: (mp[0].group(1), -_RANK[mp[0].group(2)])):
            final = self.dir / f"step_{m.group(1)}"
            if not final.exists() and self._complete(p.name):
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
        finals = sorted(n for n in os.listdir(self.dir) if (m := _TAG.match(n)) and not m.group(2))
        for name in finals[: -self.keep_last]:
            if name != keep:
                shutil.rmtree(self.dir / name, ignore_errors=True)
