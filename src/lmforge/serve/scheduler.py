"""The scheduler thread that owns the model, the jobs it runs, and the request slots.

Fairness: a job's prompts are handed to the engine one prompt (its n rows) at a time, taking
turns across jobs, and only while the batch has room; so a request with many prompts shares
the batch with requests that arrive after it instead of queueing all its prompts ahead of them.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.generation import Engine, SamplingParams
from lmforge.serve.requests import ApiError


class Job:
    """One HTTP request's generation: its prompts, parameters, and a queue of results."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompts: list[list[int]], params: SamplingParams,
                 stream: bool, deadline: float):
        self.loop, self.prompts, self.params, self.stream, self.deadline = loop, prompts, params, stream, deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self.rows: list[Any] = []  # the engine's rows, set by the scheduler thread
        self.fed = 0  # prompts handed to the engine so far (scheduler thread)
        self.closed = False  # set by the handler when it stops listening

    def push(self, item: tuple) -> None:
        """Called from the scheduler thread: hand an event to the request's handler."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    @property
    def rows_left(self) -> int:
        return (len(self.prompts) - self.fed) * self.params.n


class Scheduler:
    """The thread that owns the model: admits jobs into the engine and steps it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.turns: deque[Job] = deque()  # jobs with prompts not yet handed to the engine, in turn
        self.rows_active = 0  # for /health, written by the thread only
        self.rows_cancelled = 0  # rows stopped before they finished (client gone, timeout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work() and not self.turns)
            self._feed()
            if not self.engine.has_work():
                continue
            try:
                changed = self.engine.step()
            except Exception as e:  # a bug or out of memory in the forward pass: fail the rows in flight, keep serving
                changed = self.engine.abort_all(f"generation failed: {type(e).__name__}: {e}")
            for row in changed:
                job, base = row.tag
                if row.finish_reason == "error":
                    job.push(("error", row.error))
                    continue
                text = row.take_text()
                if text or row.finished:
                    job.push(("delta", base + row.sample_index, text, row.finish_reason, len(row.token_ids)))
            self.rows_active = self.engine.active + sum(j.rows_left for j in self.turns)

    def _feed(self) -> None:
        """Hand prompts to the engine, one per job in turn, while the batch has room for them."""
        engine = self.engine
        while self.turns:
            job = self.turns[0]
            if job.closed or job.fed == len(job.prompts):
                self.turns.popleft()
                continue
            if engine.has_work() and engine.active + job.params.n > engine.max_batch:
                return
            self.turns.rotate(-1)
            i = job.fed
            job.fed += 1
            try:
                # Choice i*n + j is completion j of prompt i, seeded with stream i*n + j.
                job.rows += engine.add(job.prompts[i], job.params, tag=(job, i * job.params.n), stream=job.stream,
                                       seed_stream=i * job.params.n)
            except LmforgeError as e:  # the request itself is at fault: a 400, not a 500
                for r in job.rows:
                    engine.cancel(r)
                job.fed = len(job.prompts)
                job.push(("invalid", str(e)))

    def _drain(self, block: bool) -> None:
        try:
            kind, job = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "add" and not job.closed:
                self.turns.append(job)
            elif kind == "cancel":
                job.fed = len(job.prompts)  # prompts not yet started never will be
                for r in job.rows:
                    if not r.finished:
                        self.rows_cancelled += 1
                        self.engine.cancel(r)
            try:
                kind, job = self.inbox.get_nowait()
            except queue.Empty:
                return


class Slots:
    """At most `limit` requests generating and `queue_limit` waiting; beyond that, 429 at once.

    Used from the event loop only, so plain counters are safe.
    """

    def __init__(self, limit: int, queue_limit: int):
        self.limit, self.queue_limit = limit, queue_limit
        self.running = 0
        self.waiting: deque[asyncio.Future] = deque()

    async def acquire(self, timeout: float) -> None:
        if self.running < self.limit:
            self.running += 1
            return
        if len(self.waiting) >= self.queue_limit:
            raise ApiError(429, f"The server is busy ({self.running} requests running, {len(self.waiting)} waiting); "
                           "retry later.", None, "rate_limit_exceeded", "rate_limit_error")
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            else:
                fut.cancel()
                self.waiting.remove(fut)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ApiError(504, "The request timed out waiting for a free slot.", None, "timeout", "timeout") from None

    def release(self) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self.running -= 1
