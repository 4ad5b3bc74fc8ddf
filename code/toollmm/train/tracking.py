"""Quiet, rank-aware run tracking: one metrics dict per logged step, written by rank 0 only.

* ``metrics.jsonl`` in the stage folder (one JSON object per line: step, each loss term, lr, grad
  norm, real tokens/s, samples/s, real-token fraction, memory; validation lines carry ``split``),
* a loss-curve PNG redrawn at the end,
* wandb (offline by default, writing under the run folder; ``disabled`` is a no-op),
* a tqdm bar with ETA on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs at ``level``; other ranks only warnings and errors."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class Tracker:
    def __init__(
        self,
        out_dir: Path,
        rank: int,
        total_steps: int,
        wandb_mode: str = "disabled",
        project: str = "toollmm",
        run_name: str = "run",
        config: dict | None = None,
        start_step: int = 0,
    ):
        self.rank = rank
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if wandb_mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(
                    project=project,
                    name=run_name,
                    mode=wandb_mode,
                    dir=str(self.out_dir),
                    config=config or {},
                    resume="allow",
                )
            except Exception as e:  # a tracker must never kill a training run
                log.warning("wandb disabled: %s", e)
        if os.environ.get("TOOLLMM_NO_TQDM") != "1":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc=f"{run_name}", dynamic_ncols=True, leave=False
            )

    def log(self, metrics: dict, step: int) -> None:
        if self.rank != 0:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        shown = {k: v for k, v in row.items() if k in ("loss", "lm", "val_loss", "lr", "tok_s")}
        log.info("step %d %s", step, " ".join(f"{k}={_fmt(v)}" for k, v in shown.items() if k != "step"))

    def advance(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.rank != 0:
            return
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        try:
            plot_losses(self.path, self.out_dir / "loss.png")
        except Exception as e:
            log.warning("could not draw the loss curve: %s", e)


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted(
        {
            k
            for r in rows
            for k, v in r.items()
            if isinstance(v, (int, float)) and (k == "loss" or k.startswith(("lm", "align", "val_")))
        }
    )
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=k, marker="o" if k.startswith("val_") else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
