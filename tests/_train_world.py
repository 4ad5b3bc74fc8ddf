"""The tiny world the training tests share: the demo corpus (--small), tiny base models placed like real
checkpoints, and a config YAML with one block per stage (stage 1 starts from the random tiny Llama;
2 and 3 start from the previous stage's folder). Built once per session (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from toollmm.core.paths import REPO_ROOT

TRAIN_PY = REPO_ROOT / "code" / "train.py"
TINY_ENCODER = str(REPO_ROOT / "config" / "presets" / "encoder_tiny.yaml")  # a --config flag: cwd-relative


@dataclass
class World:
    root: Path
    demo: Path
    base: Path
    config: Path

    def args(self, stage: int, run: str, *overrides: str, init_from: str | None = "previous") -> list[str]:
        """``train.py`` arguments for ``stage`` of run ``run`` (outputs under ``root/out/<run>``). By default
        stages 2 and 3 start from the same run's previous stage (config/stage_N.yaml's ``previous``)."""
        head = [
            "--stage",
            str(stage),
            "--config",
            TINY_ENCODER,
            "--config",
            str(self.config),
            f"run.name={run}",
        ]
        if init_from != "previous":
            head.append(f"train.init_from={init_from or 'null'}")
        return head + list(overrides)

    def stage_dir(self, run: str, stage: int) -> Path:
        return self.root / "out" / run / f"stage_{stage}"

    def source(self, split: str, name: str) -> dict:
        return {"path": str(self.demo / split / f"{name}.jsonl"), "media_root": str(self.demo)}


def build_world(root: Path) -> World:
    from toollmm.core.config import load_config
    from toollmm.demo.corpus import generate_demo_corpus
    from toollmm.model.tiny import TinyLlama, build_base_models

    root = Path(root)
    demo, base = root / "demo", root / "base"
    generate_demo_corpus(demo, small=True)
    model_cfg = load_config(config_files=[TINY_ENCODER]).config.model
    shape = TinyLlama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    build_base_models(base, demo / "tokenizer", model_cfg, llm=shape)
    w = World(root, demo, base, root / "train.yaml")
    small_proj = {"d_model": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1}
    diffusion = {"image": "tiny-sd", "video": "tiny-t2v", "audio": "tiny-audioldm"}
    conf = {
        "run": {"output_root": str(root / "out")},
        "model": {
            "encoder": {"checkpoint": str(base / "imagebind" / "imagebind_tiny.pth")},
            "feature_cache": {"dir": str(root / "features")},
            "llm": {
                "path": str(base / "llm_init"),
                "dtype": "float32",
                "gradient_checkpointing": False,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            },
            "output_proj": {m: {**small_proj, "dim_feedforward": 64} for m in diffusion},
            "decoders": {m: {"path": str(base / "diffusion" / d)} for m, d in diffusion.items()},
        },
        "data": {"max_length": 384, "num_workers": 0, "captions": str(root / "captions")},
        "train": {
            "micro_batch_size": 2,
            "max_steps": 2,
            "log_every": 1,
            "eval_every": 0,
            "save_every": 0,
            "eval_batches": 1,
            "optim": {"warmup_steps": 0, "lr": 1.0e-2},
        },
        "logging": {"wandb_mode": "disabled"},
        "stages": {
            0: {"data": {"train": [w.source("train", "lm_pretrain")], "heldout": []}},
            1: {
                "data": {
                    "train": [w.source("train", n) for n in ("x2t_image", "x2t_audio", "x2t_video")],
                    "heldout": [w.source("heldout", "x2t_image")],
                }
            },
            2: {
                "data": {
                    "train": [w.source("train", n) for n in ("t2x_image", "t2x_audio", "t2x_video")],
                    "heldout": [w.source("heldout", "t2x_image")],
                    "group_by_length": False,  # mixed batches: every projection sees a target
                },
                "train": {"micro_batch_size": 4},
            },
            3: {
                "data": {
                    "train": [w.source("train", n) for n in ("instruct", "tools", "t2x_image")],
                    "heldout": [w.source("heldout", "tools")],
                },
            },
        },
    }
    w.config.write_text(yaml.safe_dump(conf, sort_keys=False))
    return w


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """Environment for training subprocesses: this checkout's code first, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOOLLMM_NO_TQDM": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "code"), env.get("PYTHONPATH", "")])
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # from in-process runs
        env.pop(k, None)
    return {**env, **extra}


def run_logged(cmd: list[str], log: Path, timeout: float = 600, **env: str) -> int:
    """Run ``cmd`` in its own session with output to ``log``; on timeout the whole process group (launcher,
    ranks, DataLoader workers) is killed, so a hung rank never outlives the test."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(**env), start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(
                f"timed out after {timeout} s: {' '.join(cmd)}\n{Path(log).read_text()[-3000:]}"
            ) from None


def run_train(args: list[str], log: Path, timeout: float = 600) -> int:
    """``python code/train.py ARGS`` in a process of its own; returns the exit code."""
    return run_logged([sys.executable, str(TRAIN_PY), *args], log, timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
