"""Between an HTTP request and the scheduler, for every dialect.

A request is queued, then raced against the client's disconnect until its first event arrives, so
a client that gives up while waiting is dropped from the queue before it costs the model anything;
errors known before that first event (queue full, queue timeout) still become proper HTTP statuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from server.engine.base import (
    Delta,
    Embedded,
    EmbeddingRequest,
    End,
    Event,
    Finished,
    GenerationRequest,
    TokenLogprob,
)
from server.errors import InvalidRequest
from server.registry import ModelKind
from server.scheduler import ModelWorker


async def model_worker(
    request: Request, name: str | None, *, kind: ModelKind | None = "generation"
) -> ModelWorker:
    """The worker for a request's model (loading it if needed), labelling the request with it.

    ``kind`` is what the route does with it: a model of another kind is a 400 naming `model`
    before anything is loaded (None: any kind, for routes that only describe a model).
    """
    manager = request.app.state.manager
    if kind is not None and (cfg := manager.config(name)).kind != kind:
        if cfg.kind == "embedding":
            message = f"model {cfg.name!r} is an embedding model; it cannot generate text"
        else:
            message = f"model {cfg.name!r} generates text; it cannot compute embeddings"
        raise InvalidRequest(message, param="model")
    worker: ModelWorker = await manager.get(name)
    request.state.model = worker.name
    return worker


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before we could answer; nothing is sent."""


async def start(
    worker: ModelWorker, greq: GenerationRequest, request: Request, label: str
) -> AsyncIterator[Event]:
    """Queue the request and wait for its first event, dropping it if the client leaves first."""
    events = worker.stream(greq, label=label)
    first = asyncio.ensure_future(anext(events))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await events.aclose()
        raise ClientGone
    gone.cancel()
    head = first.result()  # re-raises Overloaded / QueueTimeout / ModelUnavailable as HTTP errors

    async def chained() -> AsyncIterator[Event]:
        try:
            yield head
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return chained()


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finished | None = None


async def collect(events: AsyncIterator[Event], request: Request, n: int) -> list[Choice]:
    """Gather every event of a non-streamed request; a client that leaves cancels it."""
    choices = [Choice() for _ in range(n)]

    async def consume() -> None:
        async for ev in events:
            c = choices[ev.index]
            if isinstance(ev, Delta):
                c.text += ev.text
                c.token_ids.extend(ev.token_ids)
                c.logprobs.extend(ev.logprobs)
            else:
                c.finish = ev

    task = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    gone.cancel()
    task.result()
    return choices


def finish_reason(f: Finished | None) -> str | None:
    return None if f is None or f.reason == "cancelled" else f.reason


async def embed(
    worker: ModelWorker, ereq: EmbeddingRequest, request: Request, label: str
) -> list[Embedded]:
    """Run an embedding request to its end; a client that leaves cancels it."""
    # TEMPORARY until the scheduler takes every request type through `engine.submit` ("Scheduler:
    # one engine contract"): the engine is called directly, outside the worker's queue bound,
    # queue timeout and metrics. `label` is for the request log the scheduler writes.
    del label
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(ev: Event) -> None:  # called on the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, ev)

    handle = worker.engine.submit(ereq, sink)

    async def consume() -> list[Embedded]:
        got: list[Embedded] = []
        while not isinstance(ev := await events.get(), End):
            if isinstance(ev, Embedded):
                got.append(ev)
        if ev.error is not None:
            raise ev.error
        return got

    task = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        handle.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    gone.cancel()
    return task.result()
