"""Requests from many clients -> shared ``Engine.generate`` calls on one worker thread.

A request is a ``Job`` (its prompt ids, preprocessed media and ``RowOptions``: its own seed, sampling,
budget, stop strings and tool choice). The worker takes the first waiting job, waits at most
``batch_wait_ms`` for more (up to ``max_batch_size``; only when other clients are active, see
``_collect``) and decodes them together; with the batched step
model each row has its own KV-cache rows, so a row's tokens do not depend on its batch-mates. Streaming
events (token ids as they are appended, then the result) go back to the job's asyncio loop. A job whose
client went away is cancelled (``RowOptions.cancelled``): it is dropped before its batch starts, or its row
ends at the next step. An exception in a generate call fails that batch's jobs, never the worker.

Continuous batching (``serve.continuous``, when the step model has ``join`` / ``leave``, as
``BatchedStepModel`` does): there is one running batch instead of one generate call per batch. Between two
decode steps the waiting jobs are prefilled and join it (up to ``max_batch_size`` rows), and a row that
finished leaves it and is answered at once, so no request waits for a batch to form or for the longest
row of its batch. Each row goes through the engine's own per-row state machine (``Engine._advance`` /
``_collect`` / ``_result``, exactly what ``generate`` runs), with its own cache rows, seed and options.
``batch_sizes`` then counts the rows admitted together; ``steps`` / ``step_rows`` the decode steps and
the rows they carried (``step_rows / steps`` = mean rows per forward).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..agent.engine import RowOptions
from ..agent.state import RowState

log = logging.getLogger(__name__)


@dataclass
class Job:
    prompt: list[int]
    media: dict
    options: RowOptions
    run_tools: bool
    on_event: Any  # callable(kind, payload), called from the worker thread
    stream: bool = False  # send "tokens" events (only streams need them)
    emitted: bool = False  # a token was appended (a streamed job cannot be rerun once it has shown text)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        engine_of,
        max_batch_size: int = 8,
        batch_wait_ms: float = 50.0,
        arriving=None,
        continuous: bool = True,
    ):
        """``engine_of()`` returns the engine to use (the runtime's, read at each batch); ``arriving()``
        how many requests are being prepared (not yet submitted); ``continuous``: run one batch that jobs
        join and leave between steps when the step model can (``join`` / ``leave``)."""
        if max_batch_size < 1:
            raise ValueError(f"serve.max_batch_size must be >= 1, got {max_batch_size}")
        self.engine_of = engine_of
        self.max_batch_size = int(max_batch_size)
        self.wait_s = max(0.0, float(batch_wait_ms)) / 1000.0
        self.q: queue.Queue[Job | None] = queue.Queue()
        self.batch_sizes: list[int] = []  # every batch run (for tests and the bench)
        self.finished: Counter[str] = Counter()  # rows per finish reason (``cancelled``: client went away)
        self.busy = False
        self.arriving = arriving or (lambda: 0)
        self.last_size = 0
        self.continuous = continuous
        self.steps = 0  # decode steps run by the continuous loop
        self.step_rows = 0  # rows those steps carried
        self.joined = 0  # jobs prefilled into a batch that was already decoding
        self._ids = itertools.count(1)  # row ids of the continuous loop
        self._thread = threading.Thread(target=self._loop, name="toollmm-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.q.put(job)

    def close(self) -> None:
        self.q.put(None)
        self._thread.join(timeout=30)

    def _collect(self) -> list[Job] | None:
        """The first waiting job plus whoever joins within ``batch_wait_ms``. The wait is only spent when
        batch-mates are likely: the previous batch had several rows, or requests are being prepared
        right now (``arriving``); a lone client (one request at a time) never waits."""
        first = self.q.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.perf_counter() + self.wait_s
        while len(batch) < self.max_batch_size:
            left = deadline - time.perf_counter()
            if left <= 0 or not (self.last_size > 1 or self.arriving() > 0):
                left = 0.0
            try:
                job = self.q.get(timeout=min(left, 0.005)) if left > 0 else self.q.get_nowait()
            except queue.Empty:
                if left > 0:
                    continue
                break
            if job is None:
                self.q.put(None)
                break
            batch.append(job)
        self.last_size = len(batch)
        return batch

    def _loop(self) -> None:
        while True:
            engine = self.engine_of()
            if self.continuous and hasattr(engine.model, "join") and hasattr(engine.model, "leave"):
                if self._continuous(engine):
                    return
                continue
            batch = self._collect()
            if batch is None:
                return
            live = [j for j in batch if not j.cancelled.is_set()]
            for j in batch:
                if j.cancelled.is_set():
                    j.on_event("cancelled", None)
            if live:
                self.busy = True
                try:
                    self._run(live)
                finally:
                    self.busy = False

    def _run(self, jobs: list[Job]) -> None:
        self.batch_sizes.append(len(jobs))
        for j in jobs:
            j.options.cancelled = j.cancelled.is_set

        def on_tokens(r: int, ids: list[int]) -> None:
            jobs[r].emitted = True
            if jobs[r].stream:
                jobs[r].on_event("tokens", ids)

        try:
            engine = self.engine_of()
            rows = engine.generate(
                [j.prompt for j in jobs],
                [j.media for j in jobs],
                on_tokens=on_tokens,
                stop_at_tool_call=[not j.run_tools for j in jobs],
                options=[j.options for j in jobs],
            )
        except Exception as e:  # a failed batch fails its requests, never the server
            log.exception("generate failed for a batch of %d", len(jobs))
            for j in jobs:
                if len(jobs) > 1 and not (j.stream and j.emitted):
                    self._run([j])  # alone: only the request that breaks generation fails
                else:
                    j.on_event("error", f"{type(e).__name__}: {e}")
            return
        for j, row in zip(jobs, rows):
            self.finished[row.finish_reason] += 1
            j.on_event("done", row)

    # ------------------------------------------------------------------------------ continuous batching
    def _take(self, block: bool, free: int) -> tuple[list[Job], bool]:
        """Up to ``free`` waiting jobs (waiting for the first when ``block``); True when closing."""
        jobs: list[Job] = []
        while len(jobs) < free:
            try:
                job = self.q.get() if block and not jobs else self.q.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            if job.cancelled.is_set():
                job.on_event("cancelled", None)
                continue
            jobs.append(job)
        return jobs, False

    def _continuous(self, engine) -> bool:
        """The running batch of one engine; returns True when the batcher closes, False when the engine
        changed (the next loop picks the new one up)."""
        model, rows, state, closing = engine.model, [], None, False
        while True:
            if not rows and (closing or self.engine_of() is not engine):
                return closing
            new, closed = self._take(block=not rows, free=self.max_batch_size - len(rows))
            closing = closing or closed
            if new and not rows and self.engine_of() is not engine:  # switched while idle: new engine
                self._run(new)
                return closing
            if new:
                self.busy = True
                state = self._admit(engine, model, state, rows, new)
            if not rows:
                self.busy = False
                state = None
                continue
            try:
                rows, state = self._step(engine, model, state, rows)
            except Exception:  # anything else that breaks: each row is rerun alone, never the worker dies
                log.exception("continuous batch of %d failed", len(rows))
                jobs = [r.job for r in rows if not r.answered]
                rows, state = [], None
                for j in jobs:
                    try:
                        self._retry_alone(j)
                    except Exception:  # e.g. its client's event loop is gone
                        log.exception("could not rerun or fail a request")
            if not rows:
                self.busy, state = False, None

    def _step(self, engine, model, state, rows: list[_Row]) -> tuple[list[_Row], Any]:
        """One decode step of the running batch: every row advances (finished rows are answered and
        leave), then one forward appends every row's tokens."""
        appends, starts, keep = [], [], []
        for k, row in enumerate(rows):
            start = len(row.st.gen)
            toks = engine.next_tokens(row.st, row.logits, row.t0)  # its options carry the job's cancel flag
            if toks:
                appends.append(toks)
                starts.append(start)
                keep.append(k)
            else:  # finished: answered now, its cache rows freed before the next step
                self._answer(engine, row)
        if len(keep) < len(rows):
            rows = [rows[k] for k in keep]
            if not rows:
                return [], None
            model.leave(state, keep)
        ts = time.perf_counter()
        out = model.step(state, appends)  # raising: the caller reruns each row alone
        dt = time.perf_counter() - ts
        self.steps += 1
        self.step_rows += len(rows)
        for k, (row, toks, start) in enumerate(zip(rows, appends, starts)):
            row.model_s += dt
            row.logits = out.logits[k]
            hid = out.hidden[k] if out.hidden is not None else None
            engine.collect(row.st, row.st.prompt_len + start, len(toks), hid, state, engine.signal_hook)
            row.job.emitted = True
            if row.job.stream:
                row.job.on_event("tokens", list(toks))
        return rows, state

    def _admit(self, engine, model, state, rows: list[_Row], jobs: list[Job]):
        """Prefill ``jobs`` into the running batch (or start one); a group that fails is retried one job
        at a time, so only the job that breaks the model fails."""
        groups = [jobs]
        while groups:
            group = groups.pop(0)
            t0 = time.perf_counter()
            try:
                prompts, media = [j.prompt for j in group], [j.media for j in group]
                if state is None:
                    state, out = model.start(prompts, media)
                else:
                    out = model.join(state, prompts, media)
            except Exception as e:
                if len(group) > 1:
                    groups.extend([j] for j in group)
                    continue
                log.exception("prefill failed for a request")
                group[0].on_event("error", f"{type(e).__name__}: {e}")
                continue
            self.batch_sizes.append(len(group))
            self.joined += len(group) if rows else 0
            dt = time.perf_counter() - t0
            for k, j in enumerate(group):
                j.options.cancelled = j.cancelled.is_set
                st = engine.new_row(next(self._ids), len(j.prompt), not j.run_tools, j.options)
                rows.append(_Row(j, st, out.logits[k], t0, dt))
        return state

    def _answer(self, engine, row: _Row) -> None:
        self.finished[row.st.finish_reason] += 1
        row.answered = True  # never rerun, even if delivering the answer fails
        row.job.on_event("done", engine.result(row.st, round(row.model_s, 4)))

    def _retry_alone(self, job: Job) -> None:
        if job.stream and job.emitted:
            job.on_event("error", "the decode step failed")
            return
        job.emitted = False
        self._run([job])


@dataclass
class _Row:
    """One job's row in the running batch: its engine state, its next-token logits, its own clock."""

    job: Job
    st: RowState
    logits: Any
    t0: float
    model_s: float
    answered: bool = False
