"""Scheduling: one worker per loaded model, a bounded FIFO queue in front of it.

llama.cpp contexts are not thread-safe, so an engine says how many requests it can take at once
(``slots``): the simple engine one, a batched engine several, which it steps together in its own
decode loop. The worker runs that many threads over one FIFO queue; events travel back to the
event loop through an asyncio queue. Cancellation (client
gone, timeout) sets a flag the engine polls between tokens; a cancelled request still waiting in
the queue is skipped without touching the model, so a burst of aborted requests costs nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.engine.base import Delta, Engine, Event, Finished, GenerationRequest
from server.errors import Overloaded, QueueTimeout
from server.metrics import Metrics

log = logging.getLogger("codeserve.requests")

_DONE = object()


@dataclass
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def emit(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


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
        self.queue_timeout_s = queue_timeout_s
        self.metrics = metrics
        self.running = 0  # jobs inside the engine right now (at most engine.slots)
        self._running_lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._in_flight = 0  # queued + running; touched only on the event loop
        self._threads = [
            threading.Thread(target=self._run, name=f"worker-{name}-{i}", daemon=True)
            for i in range(max(1, getattr(engine, "slots", 1)))
        ]
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def stream(self, request: GenerationRequest, *, label: str = "") -> AsyncIterator[Event]:
        """Queue a request and yield its events; leaving early cancels it."""
        job = Job(request, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(
                f"model {self.name!r} has {self._queue.maxsize} requests waiting; retry later"
            ) from None
        self._in_flight += 1
        outcome = "error"
        finished: list[Finished] = []
        token_times: list[float] = []
        try:
            try:
                await asyncio.wait_for(job.started.wait(), self.queue_timeout_s)
            except TimeoutError:
                raise QueueTimeout(
                    f"request waited {self.queue_timeout_s:g}s for model {self.name!r} without "
                    "being scheduled; the server is busy, retry later"
                ) from None
            while (item := await job.events.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Finished):
                    finished.append(item)
                elif isinstance(item, Delta) and item.token_ids:
                    token_times.append(time.perf_counter())
                yield item
            outcome = "cancelled" if any(f.reason == "cancelled" for f in finished) else "ok"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            job.cancel.set()
            self._in_flight -= 1
            _log_request(self.name, label, job, finished, outcome)
            if self.metrics is not None:
                ttft = token_times[0] - job.enqueued if token_times else None
                gaps = (b - a for a, b in itertools.pairwise(token_times))
                self.metrics.record_generation(self.name, finished, ttft, gaps)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancel.is_set():  # its client left while it waited
                job.emit(_DONE)
                continue
            job.loop.call_soon_threadsafe(job.started.set)
            with self._running_lock:
                self.running += 1
            try:
                serve = getattr(self.engine, "serve", None)
                if serve is not None:  # the engine delivers events from its own thread
                    serve(job.request, job.cancel.is_set, job.emit)
                else:
                    for event in self.engine.generate(job.request, job.cancel.is_set):
                        job.emit(event)
            except Exception as e:
                log.exception("generation failed on model %s", self.name)
                job.emit(e)
            finally:
                with self._running_lock:
                    self.running -= 1
                job.emit(_DONE)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self.engine.close()


def _log_request(model: str, label: str, job: Job, finished: list[Finished], outcome: str) -> None:
    prompt = finished[0].timings.prompt_tokens if finished else len(job.request.prompt)
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
