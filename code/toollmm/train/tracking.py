"""Quiet, rank-aware run tracking: one metrics dict per logged step, written by rank 0 only.

* ``metrics.jsonl`` in the stage folder: one JSON object per logged step with ``step``, each loss term
  (``loss``, ``lm``, ``align_<modality>``; means over the window's micro-batches and all ranks that HAD
  that term: a window without a modality's signal targets has no ``align_<modality>`` key, not a 0), ``lr``,
  ``grad_norm``, ``tok_s`` (real, non-padding tokens per second, all ranks), ``samples_s``,
  ``real_token_fraction``, ``mem_mb`` / ``mem_peak_mb`` (GPU allocated / peak allocated, or the process's
  resident / peak resident memory on CPU; the largest rank's), ``step_s`` and ``epoch``; validation lines
  hold ``val_<term>``; ``event`` lines mark start and end. A resumed run first drops the lines past its
  checkpoint, so the file reads as one uninterrupted run.
* a loss-curve PNG (``loss.png``) redrawn at the end,
* wandb (offline by default, writing ``<stage folder>/wandb/offline-run-*``; ``disabled`` is a no-op;
  the run id is stable per run and stage, so a resumed run continues the same wandb run),
* the console (rank 0 only): on a terminal, one tqdm bar with ETA and the log lines written above it
  (``BarAwareHandler``); when stderr is not a terminal (a log file, CI), no bar and no carriage returns:
  each metrics line says ``step N/TOTAL (P %, ETA)``, and a plain progress line comes at least every
  ``PROGRESS_EVERY_S`` seconds between them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 60.0  # without a bar: a progress line at least this often


def console_is_terminal() -> bool:
    """stderr is a terminal (draw a bar) rather than a file or pipe (write plain lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class BarAwareHandler(logging.StreamHandler):
    """A stderr handler that writes each record through ``tqdm.write``: the progress bar is cleared,
    the line printed above it, then the bar redrawn, so a log line never lands on the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs toollmm at ``level``; other ranks only warnings and errors. A process without logging
    handlers (the command line) gets one; an embedding program's (or pytest's) handlers are kept."""
    lvl = getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        handler = BarAwareHandler(sys.stderr) if console_is_terminal() else logging.StreamHandler(sys.stderr)
        logging.basicConfig(
            level=lvl,
            format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            handlers=[handler],
        )
    logging.getLogger("toollmm").setLevel(lvl)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def memory_mb() -> tuple[float, float]:
    """(current, peak) MiB: GPU memory allocated by torch, or this process's resident set on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    import resource

    import psutil

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return psutil.Process().memory_info().rss / 2**20, peak_kb / 1024


def term_present(key: str, batch) -> bool:
    """Whether the loss term ``key`` was really computed on ``batch``. The model returns every term on
    every batch (ZeRO-3 needs the same module calls everywhere), with ``align_<modality>`` as a zero when
    the batch holds no signal targets of that modality: such a zero is not a measurement and is left out
    of every mean (on a log-scale loss curve it would dive to the floor)."""
    if not key.startswith("align_"):
        return True
    targets = getattr(batch, "signal_targets", {}).get(key[len("align_") :])
    return targets is not None and targets.positions.shape[0] > 0


class MetricsWindow:
    """Loss terms, token counts and compute time since the last metrics line."""

    def __init__(self):
        self.sums: dict = defaultdict(float)  # loss term -> running sum (a device tensor once added to)
        self.counts: dict = defaultdict(int)  # loss term -> micro-batches that really had it (host-side)
        self.n = self.real = self.total = self.samples = self.steps = 0
        self.seconds = 0.0

    def add(self, out: dict, batch) -> None:
        for k, v in out.items():
            present = term_present(k, batch)
            if present:  # stays on the device: no sync per micro-batch
                self.sums[k] = self.sums[k] + v.detach().double()
            else:
                self.sums[k] = self.sums[k] + 0.0  # the key exists on every rank (same collective size)
            self.counts[k] += int(present)
        self.n += 1
        self.real += batch.real_tokens
        self.total += batch.input_ids.numel()
        self.samples += sum(len(r) for r in batch.sample_ids)

    def mean(self, key: str) -> float:
        return float(self.sums[key]) / max(1, self.counts[key])

    def metrics(self, engine, stream=None) -> dict:
        """The metrics line, summed over ranks (a collective: every rank calls it at the same step)."""
        import torch

        keys = sorted(self.sums)
        counts = [self.n, self.real, self.total, self.samples]
        # on the engine's device: NCCL reduces CUDA tensors only
        t = torch.tensor(
            [float(self.sums[k]) for k in keys] + [float(self.counts[k]) for k in keys] + counts,
            dtype=torch.float64,
            device=engine.device,
        )
        mem = torch.tensor(memory_mb(), dtype=torch.float64, device=engine.device)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        n, real, total, samples = (float(x) for x in t[2 * len(keys) :])
        dt = max(1e-9, self.seconds)
        gn = engine.get_global_grad_norm()
        row = {
            k: float(t[i]) / float(t[len(keys) + i])
            for i, k in enumerate(keys)
            if float(t[len(keys) + i]) > 0
        }
        row.update(
            lr=float(engine.get_lr()[0]),
            grad_norm=float(gn) if gn is not None else None,
            tok_s=real / dt,
            samples_s=samples / dt,
            real_token_fraction=real / max(1.0, total),
            mem_mb=round(float(mem[0]), 1),
            mem_peak_mb=round(float(mem[1]), 1),
            step_s=dt / max(1, self.steps),
        )
        if stream is not None:
            row["epoch"] = round(stream.epoch + stream.consumed / max(1, stream.steps_per_epoch), 4)
        return row


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
        self.total, self.start_step, self.step = total_steps, start_step, start_step
        self.t0 = self.last_line = time.perf_counter()
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        if wandb_mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(
                    project=project,
                    name=run_name,
                    mode=wandb_mode,
                    dir=str(self.out_dir),
                    config=config or {},
                    id=wandb_id(self.out_dir, run_name),
                    resume="allow",
                )
            except Exception as e:  # a tracker must never kill a training run
                log.warning("wandb disabled: %s", e)
        if os.environ.get("TOOLLMM_NO_TQDM") != "1" and console_is_terminal():
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
        shown = {k: v for k, v in row.items() if k in ("event", "loss", "lm", "val_loss", "lr", "tok_s")}
        log.info("%s %s", self.progress(step), " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
        self.last_line = time.perf_counter()

    def progress(self, step: int) -> str:
        """``step 20/88 (23 %, 0.31 s/step, ETA 0:00:21)``: where the run is, for a line of text."""
        done = step - self.start_step
        text = f"step {step}/{self.total} ({100 * step / max(1, self.total):.0f} %"
        if done > 0:
            per = (time.perf_counter() - self.t0) / done
            eta = int(per * max(0, self.total - step))
            text += f", {per:.2f} s/step, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        return text + ")"

    def advance(self, n: int = 1, **postfix) -> None:
        self.step += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        elif self.rank == 0 and time.perf_counter() - self.last_line >= PROGRESS_EVERY_S:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in postfix.items())
            log.info("%s %s", self.progress(self.step), shown)
            self.last_line = time.perf_counter()

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


def wandb_id(out_dir: Path, run_name: str) -> str:
    """Stable per stage folder, so a resumed run logs into the same wandb run."""
    digest = hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_name)
    return f"{safe}-{digest}"


def truncate_metrics(path: Path, start_step: int) -> None:
    """Fresh start: no old lines. Resume from ``start_step``: drop the lines logged after it (and an old
    ``end`` event: the resumed run writes its own)."""
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [json.dumps(r) for r in rows if r["step"] <= start_step and r.get("event") != "end"]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


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
    """Training terms as lines, validation terms (``val_*``) as their own dashed curves with markers, on
    a log axis; a term a logged step did not have is simply absent there (never drawn as 0), and the
    legend sits outside the axes so it covers no data."""
    fig = loss_figure(read_metrics(metrics_path))
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def loss_figure(rows: list[dict]):
    """The matplotlib figure ``plot_losses`` saves (``None`` without rows)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def is_loss(k: str) -> bool:
        base = k[len("val_") :] if k.startswith("val_") else k
        return base == "loss" or base.startswith(("lm", "align"))

    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and is_loss(k)})
    train_keys = [k for k in keys if not k.startswith("val_")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = {k: f"C{i % 10}" for i, k in enumerate(train_keys)}
    drawn = 0
    for k in keys:
        base = k[len("val_") :] if k.startswith("val_") else k
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and r[k] > 0]
        if not pts:
            continue
        is_val = k.startswith("val_")
        ax.plot(
            *zip(*pts),
            label=k,
            color=colours.get(base),
            linestyle="--" if is_val else "-",
            marker="o" if is_val or len(pts) == 1 else None,
            markersize=4,
        )
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if drawn:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
