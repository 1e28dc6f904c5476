"""Admission for one loaded model: who runs now, who waits, who is turned away.

An engine says how many requests it serves at once (``capacity``). Up to that many are submitted
to it straight away; up to ``queue_size`` more wait in FIFO order; beyond that a request is
refused with 429 at once, so a burst of ``capacity + queue_size`` is admitted whole. Everything
here runs on the event loop: the engine's thread only hands events over
(``call_soon_threadsafe``), so no thread waits per slot. A request whose client leaves frees its
place at once: a waiting one leaves the queue, a running one is cancelled in the engine (its
``End`` follows within a step). Shutdown stops admitting, fails the waiting requests, gives the
running ones a bounded drain and then cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from server.engine.base import (
    Delta,
    End,
    Engine,
    Event,
    Finished,
    GenerationRequest,
    Handle,
    Request,
)
from server.errors import CodeserveError, Overloaded, QueueTimeout, ShuttingDown
from server.metrics import Metrics

log = logging.getLogger("codeserve.requests")


class Handover:
    """How far a request's consumer is behind its engine: events handed over on the engine's
    thread, events taken (formatted and written) on the loop. Backs ``EventSink.wait_taken``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._handed = 0
        self._taken = 0
        self._gone = False
        self._lagging = False

    def handed(self) -> None:
        with self._cond:
            self._handed += 1

    def took(self) -> None:
        with self._cond:
            self._taken += 1
            if self._taken >= self._handed:
                self._lagging = False
                self._cond.notify_all()

    def gone(self) -> None:
        """The consumer left: nothing more will be taken, nobody should wait for it."""
        with self._cond:
            self._gone = True
            self._cond.notify_all()

    def wait_taken(self, timeout_s: float) -> bool:
        with self._cond:
            if self._lagging and self._taken < self._handed:
                return False  # still behind since a wait ran out: not worth another
            caught_up = self._cond.wait_for(
                lambda: self._gone or self._taken >= self._handed, timeout_s
            )
            self._lagging = not caught_up
            return caught_up


@dataclass(eq=False)
class Job:
    request: Request
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    handover: Handover = field(default_factory=Handover)
    handle: Handle | None = None
    ended: bool = False
    stopped_by_shutdown: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


class ModelWorker:
    def __init__(
        self,
        name: str,
        engine: Engine,
        *,
        queue_size: int,
        queue_timeout_s: float,
        metrics: Metrics | None = None,
    ):
        self.name = name
        self.engine = engine
        self.capacity = engine.capacity
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.metrics = metrics
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_used = time.monotonic()
        # Events from the engine's thread, handed over in batches: one wake-up of the loop for
        # all that arrived since the last one (a step of eight streams is one wake, not eight).
        self._inbox: deque[tuple[Job, Event]] = deque()
        self._drain_scheduled = False

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting)

    async def stream(self, request: Request, *, label: str = "") -> AsyncGenerator[Event, None]:
        """Admit a request and yield its events; leaving early cancels it."""
        if not self._accepting:
            raise ShuttingDown(f"model {self.name!r} is shutting down; retry on another server")
        job = Job(request)
        if len(self._running) < self.capacity and not self._waiting:
            self._start(job)  # a bad request (e.g. a grammar that does not parse) raises here
        elif len(self._waiting) < self.queue_size:
            self._waiting.append(job)
        else:
            raise Overloaded(
                f"model {self.name!r} is serving {self.capacity} requests with "
                f"{self.queue_size} waiting; retry later"
            )
        self._idle.clear()
        outcome = "error"
        finished: list[Finished] = []
        token_times: list[tuple[float, int]] = []  # when text arrived, and its token count
        try:
            if not job.started.is_set():
                try:
                    await asyncio.wait_for(job.started.wait(), self.queue_timeout_s)
                except TimeoutError:
                    raise QueueTimeout(
                        f"request waited {self.queue_timeout_s:g}s for model {self.name!r} "
                        "without being scheduled; the server is busy, retry later"
                    ) from None
            while not isinstance(event := await job.events.get(), End):
                if isinstance(event, Finished):
                    finished.append(event)
                elif isinstance(event, Delta) and event.token_ids:
                    token_times.append((time.perf_counter(), len(event.token_ids)))
                yield event
                job.handover.took()  # the consumer is back for more: that one is out
            if event.error is not None:
                raise event.error
            if job.stopped_by_shutdown:
                raise ShuttingDown("the server shut down before this request finished")
            outcome = "cancelled" if any(f.reason == "cancelled" for f in finished) else "ok"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        except CodeserveError as e:
            outcome = type(e).__name__
            raise
        finally:
            self._leave(job)
            _log_request(self.name, label, job, finished, outcome)
            if self.metrics is not None:
                ttft = token_times[0][0] - job.enqueued if token_times else None
                # A collected answer's text comes in one piece after the first: no token gaps.
                streamed = not isinstance(job.request, GenerationRequest) or job.request.stream
                # Tokens that came together (a frame of several, accepted drafts) share the gap.
                gaps = (
                    (b - a) / n
                    for (a, _), (b, n) in itertools.pairwise(token_times)
                    if streamed
                    for _ in range(n)
                )
                self.metrics.record_generation(self.name, finished, ttft, gaps)

    def _start(self, job: Job) -> None:
        job.handle = self.engine.submit(job.request, _JobSink(self, job))
        self._running.add(job)
        job.started.set()

    def _hand_over(self, loop: asyncio.AbstractEventLoop, job: Job, event: Event) -> None:
        """On the engine's thread: queue an event for the loop, waking it once per batch."""
        job.handover.handed()
        self._inbox.append((job, event))
        # Appended before the flag is read, and the drain clears the flag before it reads
        # the inbox, so every event is drained by a call scheduled at or after its append.
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        inbox = self._inbox
        while inbox:
            self._deliver(*inbox.popleft())

    def _deliver(self, job: Job, event: Event) -> None:
        if isinstance(event, End):
            job.ended = True
            self._running.discard(job)
            self._promote()
        job.events.put_nowait(event)

    def _promote(self) -> None:
        """Start waiting requests while the engine has room."""
        while self._waiting and len(self._running) < self.capacity:
            job = self._waiting.popleft()
            try:
                self._start(job)
            except Exception as e:  # refused by the engine: that request fails, not the others
                job.ended = True
                job.started.set()
                job.events.put_nowait(End(e))
        self._note_idle()

    def _leave(self, job: Job) -> None:
        """The consumer is gone (done, failed or left): free the request's place now."""
        self.last_used = time.monotonic()
        job.handover.gone()
        if job in self._waiting:
            self._waiting.remove(job)
        elif not job.ended and job.handle is not None:
            job.handle.cancel()  # its End arrives within a step and frees the running place
        self._note_idle()

    def _note_idle(self) -> None:
        if not self._running and not self._waiting:
            self._idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; fail the waiting; let the running finish for ``timeout_s``, then
        cancel them (their streams end with an error event, see ``stream``)."""
        self._accepting = False
        while self._waiting:
            job = self._waiting.popleft()
            job.ended = True
            job.started.set()
            job.events.put_nowait(End(ShuttingDown("the server is shutting down")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        for job in list(self._running):
            job.stopped_by_shutdown = True
            if job.handle is not None:
                job.handle.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5)

    def close(self) -> None:
        self.engine.close()


class _JobSink:
    """The ``EventSink`` the engine gets for one job."""

    def __init__(self, worker: ModelWorker, job: Job):
        self._worker = worker
        self._job = job
        self._loop = asyncio.get_running_loop()

    def __call__(self, event: Event) -> None:
        self._worker._hand_over(self._loop, self._job, event)

    def wait_taken(self, timeout_s: float) -> bool:
        return self._job.handover.wait_taken(timeout_s)


def _log_request(model: str, label: str, job: Job, finished: list[Finished], outcome: str) -> None:
    request = job.request
    if isinstance(request, GenerationRequest):
        prompt_len = len(request.prompt)
    else:
        prompt_len = sum(len(tokens) for tokens in request.inputs)
    prompt = finished[0].timings.prompt_tokens if finished else prompt_len
    completion = sum(f.timings.completion_tokens for f in finished)
    decode_s = sum(f.timings.decode_ms for f in finished) / 1e3
    ttft = finished[0].timings.prompt_ms if finished else float("nan")
    cached = finished[0].timings.cached_tokens if finished else 0
    tps = (completion - len(finished)) / decode_s if decode_s > 0 else float("nan")
    log.info(
        "request model=%s endpoint=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d "
        "ttft_ms=%.1f tokens_per_s=%.1f wall_ms=%.1f outcome=%s",
        model,
        label,
        prompt,
        cached,
        completion,
        ttft,
        tps,
        (time.perf_counter() - job.enqueued) * 1e3,
        outcome,
    )
