"""The model thread: every generation runs here, one at a time, in arrival order.

The Generator is not thread-safe and the server decodes one sequence at a time, so one thread owns
it and a bounded queue feeds it. The event loop only enqueues jobs and reads their events; it
never waits on the model. A job whose client still waits ends with one terminal event (Finished
or Failed), so no request is dropped silently; every job is counted once in `request_success`.

Cancellation and timeouts are checked between the text pieces `Generator.stream` yields, which is
once per accepted chunk (a step of the decode loop), unless stop strings hold text back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import torch

from eaglespec.generate import GenerationConfig, Generator
from eaglespec.serve.errors import ApiError, timeout_error
from eaglespec.serve.metrics import ServerMetrics, spec_decode_counts
from eaglespec.serve.protocol import SpeculativeStats

log = logging.getLogger("eaglespec.serve")


# -- what flows back to the request handler ------------------------------------------------


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length
    completion_tokens: int
    speculative: SpeculativeStats


@dataclass(frozen=True)
class Failed:
    error: ApiError


class Job:
    """One request on its way through the queue. Created and read on the event loop; the model
    thread only calls `emit` and reads `cancelled`."""

    def __init__(self, ids: torch.Tensor, config: GenerationConfig, timeout_s: float) -> None:
        self.ids = ids  # [prompt_len]
        self.config = config
        self.arrived = time.monotonic()
        self.timeout_s = timeout_s
        self.deadline = self.arrived + timeout_s
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating at the next step (no-op once finished)."""
        self._cancel.set()

    def emit(self, event: Piece | Finished | Failed) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone
            self.cancel()

    async def next_event(self, wait_s: float) -> Piece | Finished | Failed | None:
        """The next event, or None after wait_s seconds without one."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout=wait_s)
        except asyncio.TimeoutError:
            return None


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineWorker:
    """Owns the Generator; runs queued jobs in order on one thread."""

    def __init__(self, engine: Generator, metrics: ServerMetrics, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()  # admission is bounded in `submit`
        self._lock = threading.Lock()
        self._admitted = 0  # jobs queued or running
        self._current: Job | None = None
        self._closing = False
        self._service_s = 1.0  # running mean of a job's generation time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="eaglespec-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._admitted - (self._current is not None)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when it would be the (max_queue + 1)-th to wait."""
        with self._lock:
            if self._closing:
                raise ApiError(503, "the server is shutting down")
            # one job runs, max_queue wait: counting both avoids a race with the model thread
            # between taking a job off the queue and marking it as running
            if self._admitted > self.max_queue:
                raise QueueFull(max(1, min(600, math.ceil(self._service_s * self._admitted))))
            self._admitted += 1
            self._update_gauges()
        self._queue.put(job)

    def _update_gauges(self) -> None:  # under self._lock
        running = int(self._current is not None)
        self.metrics.running.set(running)
        self.metrics.waiting.set(self._admitted - running)

    def close(self, timeout_s: float = 10.0) -> None:
        """Fail what still waits, stop the running job and the thread."""
        with self._lock:
            self._closing = True
            current = self._current
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._finished(None)
                job.emit(Failed(ApiError(503, "the server is shutting down")))
                self.metrics.request_success["abort"].inc()
        if current is not None:
            current.cancel()
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _started(self, job: Job) -> None:
        with self._lock:
            self._current = job
            self._update_gauges()

    def _finished(self, job: Job | None) -> None:
        with self._lock:
            self._admitted -= 1
            if job is not None:
                self._current = None
            self._update_gauges()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            self._started(job)
            try:
                self._serve(job)
            except ApiError as e:
                job.emit(Failed(e))
                self.metrics.request_success["error"].inc()
            except ValueError as e:  # a request the engine refuses (validated before, so rare)
                job.emit(Failed(ApiError(400, str(e))))
                self.metrics.request_success["error"].inc()
            except Exception:
                log.exception("generation failed")
                job.emit(Failed(ApiError(500, "internal error while generating; see the server log",
                                         code="internal_error")))
                self.metrics.request_success["error"].inc()
            finally:
                self._finished(job)

    def _serve(self, job: Job) -> None:
        m, engine = self.metrics, self.engine
        start = time.monotonic()
        m.queue_time.observe(start - job.arrived)
        if job.cancelled:  # the client left while waiting
            m.request_success["abort"].inc()
            return
        if start > job.deadline:
            job.emit(Failed(timeout_error(job.timeout_s)))
            m.request_success["abort"].inc()
            return
        first: float | None = None
        aborted = False
        pieces = engine.stream(job.ids, job.config)
        try:
            for piece in pieces:
                if first is None:
                    first = time.monotonic()
                    m.ttft.observe(first - job.arrived)
                job.emit(Piece(piece))
                if job.cancelled:
                    aborted = True
                    break
                if time.monotonic() > job.deadline:
                    job.emit(Failed(timeout_error(job.timeout_s)))
                    aborted = True
                    break
        finally:
            pieces.close()
        end = time.monotonic()
        stats = engine.last_stats
        m.observe_generation(len(job.ids), stats)
        self._service_s = 0.8 * self._service_s + 0.2 * (end - start)
        if aborted:
            m.request_success["abort"].inc()
            return
        if first is None:
            m.ttft.observe(end - job.arrived)
        m.e2e.observe(end - job.arrived)
        reason = self._finish_reason(job.config)
        m.request_success[reason].inc()
        drafts, drafted, accepted, _ = spec_decode_counts(stats)
        spec = SpeculativeStats(target_forwards=stats.target_forwards, mean_accept_len=round(stats.mean_accept_len, 4),
                                drafts=drafts, drafted_tokens=drafted, accepted_tokens=accepted,
                                tokens_per_s=round(stats.tokens_per_s, 2))
        job.emit(Finished(reason, stats.new_tokens, spec))

    def _finish_reason(self, config: GenerationConfig) -> str:
        """stop: EOS or a stop string ended the answer; length: max_tokens did."""
        ids = self.engine.last_token_ids
        if config.stop:
            text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
            if any(s in text for s in config.stop):
                return "stop"
        if len(ids) >= config.max_new_tokens and not (ids and ids[-1] in self.engine._eos_ids(config)):
            return "length"
        return "stop"
