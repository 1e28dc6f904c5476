"""Run one generation through the relay and shape it as Ollama answers (NDJSON or one object).

/api/generate and /api/chat differ only in the object they wrap text in (``Shape``); queueing,
disconnects and timings are the relay's, stop handling and sampling the engine's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from server.api import relay
from server.api.ollama.protocol import GenerationFields, Logprob, TokenLogprob
from server.api.ollama.streaming import ndjson
from server.engine.base import Delta, Event, Finished, GenerationRequest
from server.engine.base import TokenLogprob as CoreLogprob
from server.errors import Unsupported
from server.scheduler import ModelWorker

# (text, logprobs or None, final fields or None while not done, every token id so far)
Shape = Callable[[str, list[Logprob] | None, dict[str, Any] | None, list[int]], BaseModel]


@dataclass(frozen=True)
class Clock:
    """When the request arrived and when its model was ready (Ollama's load_duration)."""

    start: float
    loaded: float

    @classmethod
    def starting(cls) -> Clock:
        now = time.perf_counter()
        return cls(now, now)

    def ready(self) -> Clock:
        return Clock(self.start, time.perf_counter())

    def load_ns(self) -> int:
        return int((self.loaded - self.start) * 1e9)


def final_fields(f: Finished | None, clock: Clock) -> dict[str, Any]:
    """Ollama's Metrics block (nanoseconds) and done_reason for the last object."""
    out: dict[str, Any] = {
        "done_reason": relay.finish_reason(f),
        "total_duration": int((time.perf_counter() - clock.start) * 1e9),
        "load_duration": clock.load_ns(),
    }
    if f is not None:
        t = f.timings
        out |= {
            "prompt_eval_count": t.prompt_tokens,
            "prompt_eval_duration": int(t.prompt_ms * 1e6),
            "eval_count": t.completion_tokens,
            "eval_duration": int(t.decode_ms * 1e6),
        }
    return out


def logprobs(entries: Sequence[CoreLogprob]) -> list[Logprob]:
    return [
        Logprob(
            token=e.token,
            logprob=e.logprob,
            bytes=list(e.token.encode()),
            top_logprobs=[
                TokenLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in e.top.items()
            ],
        )
        for e in entries
    ]


def one(obj: BaseModel) -> JSONResponse:
    return JSONResponse(obj.model_dump(exclude_none=True))


async def answer(
    request: Request,
    worker: ModelWorker,
    greq: GenerationRequest,
    *,
    stream: bool,
    clock: Clock,
    shape: Shape,
    label: str,
) -> Response | None:
    want_lp = greq.logprobs is not None
    try:
        events = await relay.start(worker, greq, request, label)
        if stream:
            return ndjson(_chunks(events, clock, shape, want_lp))
        [choice] = await relay.collect(events, request, 1)
    except relay.ClientGone:
        return None
    lp = logprobs(choice.logprobs) if want_lp else None
    return one(shape(choice.text, lp, final_fields(choice.finish, clock), choice.token_ids))


async def _chunks(
    events: AsyncIterator[Event], clock: Clock, shape: Shape, want_lp: bool
) -> AsyncIterator[BaseModel]:
    tokens: list[int] = []
    async for ev in events:
        if isinstance(ev, Delta):
            tokens.extend(ev.token_ids)
            if ev.text or (want_lp and ev.logprobs):
                yield shape(ev.text, logprobs(ev.logprobs) if want_lp else None, None, tokens)
        elif isinstance(ev, Finished):
            yield shape("", None, final_fields(ev, clock), tokens)


def refuse_common(body: GenerationFields) -> None:
    """Fields both routes share that change the answer and are not implemented (yet)."""
    if body.format not in (None, ""):
        raise Unsupported(
            "format: structured output (JSON mode / JSON schema) is not supported on the Ollama "
            "API yet",
            param="format",
        )
    if body.think not in (None, False):
        raise Unsupported(f"think: {body.model!r} does not support thinking", param="think")
    if body.shift:
        raise Unsupported(
            "shift: codeserve never shifts the context; generation ends with done_reason "
            '"length" when the context is full (send shift: false or leave it out)',
            param="shift",
        )


async def load_or_unload(
    request: Request, body: GenerationFields, name: str, shape: Callable[[str], BaseModel]
) -> Response:
    """Ollama's empty request: load the model (done_reason "load"), or unload it with
    keep_alive 0 (done_reason "unload")."""
    if body.keep_alive == 0:
        await request.app.state.manager.request_unload(name)
        return one(shape("unload"))
    await relay.model_worker(request, name, keep_alive=body.keep_alive)
    return one(shape("load"))
