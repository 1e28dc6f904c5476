"""One generation for /completion and /infill: request → GenerationRequest → llama-server answer.

Streams are framed as llama-server frames its native ones: ``data: {json}`` events, one per
released piece of text, then one final result per choice, and no ``[DONE]``. An error after the
stream started is one more ``data: {"error": {...}}`` event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from server.api import relay
from server.api.errors import ApiError
from server.api.llamacpp import params
from server.api.llamacpp.errors import envelope
from server.api.llamacpp.protocol import GenerationFields
from server.api.llamacpp.response import Answer
from server.api.sse import EventStream, data_frame
from server.core.budget import completion_budget
from server.core.line_rules import apply_line_rules
from server.engine.base import Delta, Event, Finished, GenerationRequest
from server.errors import CodeserveError
from server.scheduler import ModelWorker

log = logging.getLogger(__name__)


async def generate(
    worker: ModelWorker,
    body: GenerationFields,
    prompt: list[int],
    request: Request,
    label: str,
) -> JSONResponse | EventStream | None:
    engine = worker.engine
    params.refuse_unsupported(body)
    sampling, applied = params.sampling(body)
    n = body.choices()
    max_tokens = completion_budget(engine.info.n_ctx, len(prompt), body.requested_tokens())
    bias = params.logit_bias(body, engine)
    rules = params.line_rules(body)
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=tuple(body.stop),
        n=n,
        logprobs=body.n_probs or None,
        grammar=params.constraint(body),
        logit_bias=bias,
        ignore_eos=body.ignore_eos,
        # Line rules read the text as it comes, to end the generation early.
        stream=body.stream or rules is not None,
    )
    answer = Answer(
        body=body,
        model=worker.name,
        prompt_ids=prompt,
        prompt_text=engine.detokenize(prompt),
        sampling=sampling,
        samplers=applied,
        n_predict=max_tokens,
        bias=bias,
    )
    started = time.perf_counter()
    try:
        events = await relay.start(worker, greq, request, label)
        if rules is not None:
            events = apply_line_rules(
                events, rules, n=n, prompt_tokens=len(prompt), started=started
            )
        if body.stream:
            return EventStream(_frames(events, answer))
        choices = await relay.collect(events, request, n)
    except relay.ClientGone:
        return None
    results = [answer.final(i, c) for i, c in enumerate(choices)]
    return JSONResponse(results[0] if n == 1 else results)


def _data(obj: Any) -> bytes:
    return data_frame(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


async def _frames(events: AsyncIterator[Event], answer: Answer) -> AsyncIterator[bytes]:
    try:
        async for ev in events:
            if isinstance(ev, Delta):
                yield _data(answer.partial(ev))
            elif isinstance(ev, Finished):
                yield _data(answer.final_chunk(ev))
    except CodeserveError as e:
        yield _data(envelope(ApiError.of(e)))
    except Exception as e:  # headers are out: the client gets the error as the stream's end
        log.exception("generation failed mid-stream")
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
        yield _data(envelope(err))
