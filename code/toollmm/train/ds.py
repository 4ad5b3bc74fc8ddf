"""The one seam to DeepSpeed: the config dict, the process group, and the device/dtype policy.

``dsconfig/*.json`` hold systems settings only (ZeRO stage, bf16, offload). Batch sizes, gradient
accumulation, clipping and the optimiser come from the YAML and are injected here, so the JSON can
never disagree with the number of GPUs (PandaGPT #19's batch assertion). On a GPU, ``bf16.enabled`` is
honoured exactly as written (the anchors misspelt the key and silently trained in fp16: misspellings
are errors here). On CPU every precision block is switched off and the run is fp32.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

import torch

from toollmm.core.config import Config
from toollmm.core.errors import UserError
from toollmm.core.paths import resolve

log = logging.getLogger(__name__)

#: keys that belong to the YAML, never to dsconfig/*.json
YAML_OWNED = (
    "optimizer",
    "scheduler",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)
_PRECISION_KEYS = {
    "bf16": {
        "enabled",
        "immediate_grad_update",
        "check_grad_overflow",
        "bf16_master_weights_and_grads",
        "bf16_optimizer_states",
    },
    "fp16": {
        "enabled",
        "auto_cast",
        "loss_scale",
        "initial_scale_power",
        "loss_scale_window",
        "hysteresis",
        "consecutive_hysteresis",
        "min_loss_scale",
        "fp16_master_weights_and_grads",
    },
}


class DeepSpeedConfigError(UserError, ValueError):
    pass


def load_ds_json(path: str | Path) -> dict:
    """Read a dsconfig JSON, drop ``_comment``-style keys, and refuse YAML-owned or misspelt keys."""
    p = resolve(path)
    try:
        raw = json.loads(Path(p).read_text())
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"{p}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{p}: not valid JSON: {e}") from None
    ds = {k: v for k, v in raw.items() if not k.startswith("_")}
    problems = [
        f"{k!r} belongs in config/stage_N.yaml (train.*), not in the DeepSpeed JSON"
        for k in YAML_OWNED
        if k in ds
    ]
    for block, allowed in _PRECISION_KEYS.items():
        for k in ds.get(block) or {}:
            if k not in allowed:
                problems.append(f"{block}.{k!r} is not a DeepSpeed key (did you mean 'enabled'?)")
    if problems:
        raise DeepSpeedConfigError(f"{p}: " + "; ".join(problems))
    return ds


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def build_ds_config(cfg: Config, world_size: int, on_gpu: bool | None = None) -> dict:
    """The full dict handed to ``deepspeed.initialize`` for this run."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    ds = load_ds_json(cfg.train.deepspeed_config)
    t, o = cfg.train, cfg.train.optim
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    ds["gradient_clipping"] = o.grad_clip
    ds["optimizer"] = {
        "type": "AdamW",
        # torch_adam: torch's AdamW, no JIT build of DeepSpeed's fused ops (40 s on CPU, nvcc on GPU)
        "params": {
            "lr": o.lr,
            "betas": list(o.betas),
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "torch_adam": True,
        },
    }
    ds.setdefault("steps_per_print", 10**9)
    if on_gpu and ds.get("zero_optimization", {}).get("offload_optimizer"):
        ds["optimizer"]["params"].pop("torch_adam")  # ZeRO-Offload steps with DeepSpeed's CPU Adam
    if on_gpu:
        if ds.get("bf16", {}).get("enabled") and not bf16_supported():
            raise DeepSpeedConfigError(
                f"{cfg.train.deepspeed_config}: bf16.enabled is true but this GPU has no bf16 support; "
                "set it false (fp32) or use an Ampere or newer GPU"
            )
    else:
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
        zero = ds.get("zero_optimization", {})
        for k in ("offload_optimizer", "offload_param"):
            zero.pop(k, None)  # already on the CPU
    return ds


def compute_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_visible_but_unusable() -> str | None:
    """The driver explanation when ``nvidia-smi`` lists GPUs but this torch build cannot use them."""
    if torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or "GPU" not in out.stdout:
        return None
    cuda = torch.version.cuda or "none"
    return (
        f"nvidia-smi sees GPUs but torch {torch.__version__} (CUDA {cuda}) cannot use them: the NVIDIA driver is "
        "probably older than this build needs (CUDA 13.0 wheels need driver >= 580). Reinstall with "
        "`bash scripts/setup.sh --torch cu128` (CUDA 12.8, driver >= 525) or upgrade the driver. "
        "Refusing to fall back to the CPU."
    )


def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group: nccl on GPUs, gloo on CPU. Returns (rank, local_rank, world).
    The group lives as long as the process (``code/train.py`` destroys it before exit), so several stages
    can run in one process. Without a launcher (one process) the rendezvous variables are filled in,
    with a fresh free port each time unless MASTER_PORT was given. Rank 0's rendezvous store listens on
    ``MASTER_ADDR``'s address only (loopback on one node), never on every interface
    (:mod:`toollmm.train.rendezvous`)."""
    import deepspeed
    from deepspeed.constants import default_pg_timeout

    from .rendezvous import init_process_group

    global _OWN_PORT, _PORT
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    problem = gpu_visible_but_unusable()
    if problem:
        raise RuntimeError(problem)
    on_gpu = torch.cuda.is_available()
    rank, local_rank, world = (
        int(os.environ["RANK"]),
        int(os.environ["LOCAL_RANK"]),
        int(os.environ["WORLD_SIZE"]),
    )
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        backend = "nccl" if on_gpu else "gloo"
        if world == 1 and (_OWN_PORT or "MASTER_PORT" not in os.environ):
            # port 0: a free one, bound at once (a second run in one process gets a new one)
            os.environ["MASTER_PORT"] = "0"
            _OWN_PORT = True
        elif "MASTER_PORT" not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world} but MASTER_PORT is not set: launch through scripts/train.sh"
            )
        init_process_group(backend, rank, world, local_rank, default_pg_timeout)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts the group
        _PORT = int(os.environ["MASTER_PORT"])
        if _OWN_PORT:
            # our store holds that port for the life of this process: a child process (a notebook or a
            # test launching scripts/train.sh) must not inherit it as a port to listen on
            os.environ.pop("MASTER_PORT", None)
    return rank, local_rank, world


_OWN_PORT = False
_PORT: int | None = None


def rendezvous_port() -> int | None:
    """The port this process's rendezvous store uses (rank 0 listens on it), once the group is up."""
    return _PORT


def shutdown_distributed(barrier: bool = True) -> None:
    """(Barrier, then) destroy the group before interpreter exit (ZeRO-3 under torchrun crashed at exit
    about 1 run in 7 without this, ENVIRONMENT.md). No barrier after a failure: the other ranks may be
    stuck elsewhere, and the launcher stops them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            if barrier:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
