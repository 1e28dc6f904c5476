"""Between an HTTP request and the scheduler, for every dialect.

A request is queued, then raced against the client's disconnect until its first event arrives, so
a client that gives up while waiting is dropped from the queue before it costs the model anything;
errors known before that first event (queue full, queue timeout) still become proper HTTP statuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.engine.base import Delta, Embedded, EmbeddingRequest, Event, Finished, TokenLogprob
from server.engine.base import Request as Request_
from server.errors import InvalidRequest
from server.registry import ModelKind
from server.scheduler import ModelWorker

if TYPE_CHECKING:
    from server.manager import ModelManager

P = ParamSpec("P")
T = TypeVar("T")


async def blocking(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run CPU-heavy request work (tokenizing, template rendering) on a thread.

    A long prompt then delays only its own request: other streams and /health keep being served
    by the event loop meanwhile.
    """
    return await asyncio.to_thread(fn, *args, **kwargs)


# Tokenizing a text shorter than this takes less than the hop to a worker thread and back
# (measured in bench/results/2026-11-22-uvloop.md), so it runs on the event loop.
INLINE_CHARS = 2_000


async def tokenizing(chars: int, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn``, which tokenizes about ``chars`` characters of text: on the event loop when
    that is short (an editor's completion), else on a thread as ``blocking`` does."""
    if chars < INLINE_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


_LEASES = "model_leases"


async def model_worker(
    request: Request,
    name: str | None,
    *,
    keep_alive: float | None = None,
    kind: ModelKind | None = "generation",
) -> ModelWorker:
    """The worker for a request's model (loading it if needed), labelling the request with it.

    The model stays loaded until the response is over (``ModelLeases``); then its keep_alive,
    or this request's ``keep_alive`` (seconds, ``server.keepalive``), starts counting.
    ``kind`` is what the route does with the model: a model of another kind is a 400 naming
    `model` before anything is loaded (None: any kind, for routes that only describe a model).
    """
    manager = request.app.state.manager
    if kind is not None and (cfg := manager.config(name)).kind != kind:
        if cfg.kind == "embedding":
            message = f"model {cfg.name!r} is an embedding model; it cannot generate text"
        else:
            message = f"model {cfg.name!r} generates text; it cannot compute embeddings"
        raise InvalidRequest(message, param="model")
    leases: list[tuple[ModelWorker, float | None]] | None = getattr(request.state, _LEASES, None)
    worker: ModelWorker = await manager.get(name, hold=leases is not None)
    if leases is not None:
        leases.append((worker, keep_alive))
    request.state.model = worker.name
    return worker


class ModelLeases:
    """ASGI middleware: releases the models a request used once its whole response was sent.

    Pure ASGI rather than a FastAPI dependency so that a streamed body (or a client that leaves
    mid-stream) is over before the model's keep_alive starts counting.
    """

    def __init__(self, app: ASGIApp, manager: ModelManager) -> None:
        self.app = app
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[tuple[ModelWorker, float | None]] = []
        scope.setdefault("state", {})[_LEASES] = leases
        try:
            await self.app(scope, receive, send)
        finally:
            for worker, keep_alive in leases:
                self.manager.release(worker, keep_alive)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before we could answer; nothing is sent."""


async def start(
    worker: ModelWorker, greq: Request_, request: Request, label: str
) -> AsyncIterator[Event]:
    """Queue the request and wait for its first event, dropping it if the client leaves first."""
    events = worker.stream(greq, label=label)
    first = asyncio.ensure_future(anext(events))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The handler itself was cancelled (server shutdown): the request must not run on.
        gone.cancel()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await events.aclose()
        raise
    if not first.done():
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await events.aclose()
        raise ClientGone
    gone.cancel()
    head = first.result()  # re-raises Overloaded / QueueTimeout / ModelUnavailable as HTTP errors

    async def chained() -> AsyncGenerator[Event, None]:
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
            if isinstance(ev, Delta):
                c = choices[ev.index]
                c.text += ev.text
                c.token_ids.extend(ev.token_ids)
                c.logprobs.extend(ev.logprobs)
            elif isinstance(ev, Finished):
                choices[ev.index].finish = ev

    await _unless_gone(consume(), request)
    return choices


async def _unless_gone(work: Coroutine[Any, Any, None], request: Request) -> None:
    """Run ``work`` to its end, or cancel it and raise ClientGone if the client leaves first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    gone.cancel()
    task.result()


def finish_reason(f: Finished | None) -> Literal["stop", "length"] | None:
    """The wire's finish reason; a cancelled choice has none (its client is gone)."""
    if f is None or f.reason == "cancelled":
        return None
    return f.reason


async def embed(
    worker: ModelWorker, ereq: EmbeddingRequest, request: Request, label: str
) -> list[Embedded]:
    """Run an embedding request through the model's admission to its end, dropping it if the
    client leaves; its vectors, in the order the engine delivered them."""
    if not ereq.inputs:
        return []
    events = await start(worker, ereq, request, label)
    got: list[Embedded] = []

    async def consume() -> None:
        async for ev in events:
            if isinstance(ev, Embedded):
                got.append(ev)

    await _unless_gone(consume(), request)
    return got
