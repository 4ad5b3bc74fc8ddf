"""The training stream: mixed sources -> shuffled, grouped, collated batches; multi-worker, multi-rank,
deterministic for a seed, resumable from a small state.

``for batch in stream`` runs one epoch from the current position (``toollmm.data.plan`` fixes the order).
Workers each load whole windows (window ``j`` -> worker ``j % num_workers``) and tag every batch with its
index in the epoch; the main process hands batches out strictly in index order, so the sequence does not
depend on the number of workers or on prefetching. ``state_dict()`` records what the trainer has
*received* (epoch, batches consumed, skip counts); after ``load_state_dict`` the next epoch pass skips
whole consumed windows without reading them and re-reads only the window it was interrupted in.

Every rank yields exactly ``steps_per_epoch`` batches, whatever its data: bad samples are skipped (or
raise, naming file and record) and a window's shortfall becomes padding batches (``real_tokens == 0``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toollmm.core.batch import Batch
from toollmm.data import plan as P

from .collate import collate
from .records import BadSample
from .sources import Source, open_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSettings:
    micro_batch_size: int
    pad_id: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    group_by_length: bool = True
    window: int = 16
    packing: bool = False
    max_length: int = 2048
    on_error: str = "raise"
    overlong: str = "raise"
    num_workers: int = 2
    mixture: str = "scale"
    epoch_samples: int | None = None


@dataclass
class _Item:
    index: int
    batch: Batch | None = None
    skipped: dict = field(default_factory=dict)  # reason -> count, on a window's first batch
    error: BadSample | None = None


def _identity(x):
    return x


class _SeedWorker:
    def __init__(self, seed: int, epoch: int, rank: int):
        self.base = (seed, epoch, rank)

    def __call__(self, worker_id: int) -> None:
        torch.manual_seed(int(P.rng(*self.base, worker_id).integers(2**62)))


class _EpochData(IterableDataset):
    """One rank's epoch from batch ``start`` on; yields ``_Item``s (see the module docstring)."""

    def __init__(self, sources, processor, rank_plan, steps: int, start: int, epoch: int, s: StreamSettings):
        super().__init__()
        self.sources, self.processor, self.plan = sources, processor, rank_plan
        self.steps, self.start, self.epoch, self.s = steps, start, epoch, s
        self._logged: Counter = Counter()

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for j, win in enumerate(P.windows(self.steps, self.s.window)):
            if j % nw == wid and win.stop > self.start:
                yield from self._window(j, win)

    def _window(self, j: int, win: range):
        s = self.s
        rows = self.plan[win.start * s.micro_batch_size : win.stop * s.micro_batch_size]
        ok, skipped = [], Counter()
        for src, item in rows:
            try:
                ok.append(self.processor(self.sources[src].load(int(item))))
            except BadSample as e:
                if (s.overlong if e.reason == "overlong" else s.on_error) == "raise":  # skip / truncate
                    yield _Item(max(win.start, self.start), error=e)
                    return
                skipped[e.reason] += 1
                self._logged[e.reason] += 1  # the first few per reason and worker in full, then quietly
                log.log(logging.WARNING if self._logged[e.reason] <= 10 else logging.DEBUG, "skipping %s", e)
        gen = P.rng(s.seed, P._BATCHES, self.epoch, s.rank, j)
        groups = P.group_batches([len(x) for x in ok], len(win), s.micro_batch_size, s.group_by_length, gen)
        for k, g in zip(win, groups):
            if k >= self.start:
                batch = collate([ok[i] for i in g], s.pad_id, s.packing, s.max_length)
                yield _Item(k, batch, dict(skipped) if k == win.start else {})


class TrainStream:
    """Iterate batches epoch by epoch; ``state_dict``/``load_state_dict`` go into the training checkpoint."""

    def __init__(
        self, sources: list[Source], processor, settings: StreamSettings, weights: list[float] | None = None
    ):
        self.sources, self.processor, self.s = list(sources), processor, settings
        self.sizes = [len(x) for x in self.sources]
        empty = [getattr(x, "path", None) or x.name for x, n in zip(self.sources, self.sizes) if n == 0]
        if empty:
            raise ValueError(f"data source(s) without a single record: {empty}")
        self.counts = P.mixture_counts(
            self.sizes, weights or [1.0] * len(self.sources), settings.mixture, settings.epoch_samples
        )
        self.total = sum(self.counts)
        self.steps_per_epoch = P.steps_per_epoch(self.total, settings.world_size, settings.micro_batch_size)
        self.epoch, self.consumed = 0, 0
        self.skipped: Counter = Counter()
        self.padding_batches = 0
        self._agreed = False

    @classmethod
    def from_config(
        cls,
        cfg,
        processor,
        pad_id: int,
        *,
        split: str = "train",
        rank=None,
        world_size=None,
        decoder_ids=None,
    ):
        """Build from a full ``toollmm.core.config.Config`` (``data``, ``train.micro_batch_size``, ``run.seed``);
        rank and world size default to the initialised process group."""
        d = cfg.data
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        srcs = d.train if split == "train" else d.heldout
        if not srcs:
            raise ValueError(f"data.{split} lists no sources")
        train = split == "train"
        settings = StreamSettings(
            micro_batch_size=cfg.train.micro_batch_size,
            pad_id=pad_id,
            seed=cfg.run.seed,
            rank=rank,
            world_size=world_size,
            shuffle=d.shuffle and train,
            group_by_length=d.group_by_length,
            window=d.group_window,
            packing=d.packing,
            max_length=d.max_length,
            on_error=d.on_error,
            overlong=d.overlong,
            num_workers=d.num_workers,
            mixture=d.mixture if train else "scale",
            epoch_samples=d.epoch_samples if train else None,
        )
        sources = [open_source(x, d.captions, decoder_ids) for x in srcs]
        return cls(sources, processor, settings, [x.weight for x in srcs] if train else None)

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        s = self.s
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "skipped": dict(self.skipped),
            "padding_batches": self.padding_batches,
            "check": {
                "seed": s.seed,
                "world_size": s.world_size,
                "micro_batch_size": s.micro_batch_size,
                "window": s.window,
                "counts": list(self.counts),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        s = self.state_dict()["check"]
        diff = {k: (v, s[k]) for k, v in state["check"].items() if s.get(k) != v}
        if diff:
            raise ValueError(
                "cannot resume the data stream exactly: these settings changed since the checkpoint "
                f"(saved, now): {diff}"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.skipped = Counter(state.get("skipped", {}))
        self.padding_batches = int(state.get("padding_batches", 0))

    # ------------------------------------------------------------------------------- iteration
    def __len__(self) -> int:
        return self.steps_per_epoch

    def _agree(self) -> None:
        """All ranks must plan the same number of steps (same data, same settings) or they would hang."""
        dist = torch.distributed
        if self._agreed or not (dist.is_available() and dist.is_initialized()):
            return
        mine = (self.steps_per_epoch, self.total)
        got = [None] * dist.get_world_size()
        dist.all_gather_object(got, mine)
        if len(set(got)) > 1:
            raise RuntimeError(
                f"ranks disagree on (steps per epoch, samples per epoch): {got}; same data on every rank?"
            )
        self._agreed = True

    def __iter__(self):
        self._agree()
        s, epoch = self.s, self.epoch
        if self.consumed >= self.steps_per_epoch:  # resumed exactly at an epoch's end
            self.epoch, self.consumed = epoch + 1, 0
            return
        full = P.epoch_plan(self.sizes, self.counts, epoch, s.seed, s.shuffle)
        data = _EpochData(
            self.sources,
            self.processor,
            P.rank_plan(full, s.rank, s.world_size),
            self.steps_per_epoch,
            self.consumed,
            epoch,
            s,
        )
        loader = DataLoader(
            data,
            batch_size=None,
            num_workers=s.num_workers,
            collate_fn=_identity,
            worker_init_fn=_SeedWorker(s.seed, epoch, s.rank),
            prefetch_factor=2 if s.num_workers else None,
        )
        pending: dict[int, _Item] = {}
        expect = self.consumed
        it = iter(loader)
        try:
            for item in it:
                pending[item.index] = item
                while expect in pending:
                    got = pending.pop(expect)
                    if got.error is not None:
                        raise got.error
                    self.skipped.update(got.skipped)
                    self.padding_batches += got.batch.real_tokens == 0
                    self.consumed = expect = expect + 1
                    yield got.batch
        finally:
            del it  # shuts the workers down when the consumer stops early
        if expect != self.steps_per_epoch:
            raise RuntimeError(f"epoch {epoch} ended after {expect} of {self.steps_per_epoch} batches")
        log.debug(  # every epoch: too often for the console; the totals are in the run's end event
            "data epoch %d done on rank %d: %d batches (%d padding so far), skipped so far: %s",
            epoch,
            s.rank,
            expect,
            self.padding_batches,
            dict(self.skipped) or "none",
        )
        self.epoch, self.consumed = epoch + 1, 0

    def stats(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "skipped": dict(self.skipped),
            "padding_batches": self.padding_batches,
        }
