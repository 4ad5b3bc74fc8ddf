"""Requests from many clients -> shared ``Engine.generate`` calls on one worker thread.

A request is a ``Job`` (its prompt ids, preprocessed media and ``RowOptions``: its own seed, sampling,
budget, stop strings and tool choice). The worker takes the first waiting job, waits at most
``batch_wait_ms`` for more (up to ``max_batch_size``; only when other clients are active, see
``_collect``) and decodes them together; with the batched step
model each row has its own KV-cache rows, so a row's tokens do not depend on its batch-mates. Streaming
events (token ids as they are appended, then the result) go back to the job's asyncio loop. A job whose
client went away is cancelled (``RowOptions.cancelled``): it is dropped before its batch starts, or its row
ends at the next step. An exception in a generate call fails that batch's jobs, never the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..agent.engine import RowOptions

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
    def __init__(self, engine_of, max_batch_size: int = 8, batch_wait_ms: float = 50.0, arriving=None):
        """``engine_of()`` returns the engine to use (the runtime's, read at each batch); ``arriving()``
        how many requests are being prepared (not yet submitted)."""
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
