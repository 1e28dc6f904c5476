"""POST /v1/completions: text completion, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import APIRouter, Request, Response

from server.api import relay
from server.api.openai import constraints, params
from server.api.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
    now,
)
from server.api.openai.streaming import documented, sse, usage
from server.core.budget import completion_budget
from server.core.fim_request import fim_prompt
from server.core.prompt_size import check_prompt_bytes, trim_fim
from server.engine.base import Delta, Engine, Event, Finished, GenerationRequest, TokenLogprob
from server.engine.fim import ExtraFile
from server.errors import InvalidRequest, Unsupported

router = APIRouter()


def _logprobs(entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[e.top for e in entries],
        text_offset=[e.text_offset + offset for e in entries],
    )


def _tokens(engine: Engine, text: str) -> list[int]:
    check_prompt_bytes(engine, text)
    return engine.tokenize(text, add_bos=True)


def _fim_tokens(
    engine: Engine, prefix: str, suffix: str, max_tokens: int | None, body: CompletionRequest
) -> list[int]:
    prefix, suffix = trim_fim(engine, prefix, suffix)
    return fim_prompt(
        engine,
        prefix,
        suffix,
        max_tokens=max_tokens,
        extra=[ExtraFile(f.filename, f.text) for f in body.input_extra],
        filename=body.filename,
    )


def _max_tokens(body: CompletionRequest) -> int | None:
    """llama-server's ``n_predict`` stands for ``max_tokens`` (-1: up to the context's end)."""
    if body.n_predict is None:
        return body.max_tokens
    if "max_tokens" in body.model_fields_set and body.max_tokens != body.n_predict:
        raise InvalidRequest("`n_predict` and `max_tokens` disagree; send one", param="n_predict")
    return None if body.n_predict < 0 else body.n_predict


@router.post("/v1/completions", response_model=None, responses=documented(CompletionResponse))
async def create_completion(
    body: CompletionRequest, request: Request
) -> Response | CompletionResponse | None:
    worker = await relay.model_worker(request, body.model, keep_alive=body.keep_alive)
    engine = worker.engine
    if body.echo and body.logprobs is not None:
        raise Unsupported(
            "`echo` together with `logprobs` (prompt logprobs) is not supported", param="echo"
        )
    if body.suffix is not None:
        if not isinstance(body.prompt, str):
            raise InvalidRequest("with `suffix`, `prompt` must be a string", param="prompt")
        prompt = await relay.tokenizing(
            len(body.prompt) + len(body.suffix),
            _fim_tokens,
            engine,
            body.prompt,
            body.suffix,
            body.max_tokens,
            body,
        )
        prompt_text = body.prompt
    elif isinstance(body.prompt, str):
        prompt = await relay.tokenizing(len(body.prompt), _tokens, engine, body.prompt)
        prompt_text = body.prompt
    else:
        ids = cast(list[int], body.prompt)  # one prompt of token ids (see the request's validator)
        if len(ids) >= engine.info.n_ctx:  # before looking at a million ids
            completion_budget(engine.info.n_ctx, len(ids), None)
        if any(t < 0 or t >= engine.info.n_vocab for t in ids):
            raise InvalidRequest(
                f"prompt token ids must be in [0, {engine.info.n_vocab})", param="prompt"
            )
        prompt, prompt_text = list(ids), engine.detokenize(list(ids))
    if not prompt:
        raise InvalidRequest("prompt is empty", param="prompt")
    gbnf = constraints.content_grammar(body)
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=completion_budget(engine.info.n_ctx, len(prompt), _max_tokens(body)),
        sampling=params.sampling_params(body),
        stop=tuple(body.stop),
        n=body.n,
        logprobs=body.logprobs,
        time_budget_s=params.time_budget(body),
        speculation=params.speculation(body),
        grammar=gbnf,
        logit_bias=constraints.logit_bias(body, engine.info.n_vocab),
        ignore_eos=constraints.check_ignore_eos(body, gbnf),
        stream=body.stream,
    )
    cid, created, model = new_id("cmpl"), now(), worker.name
    echo = prompt_text if body.echo else ""
    try:
        events = await relay.start(worker, greq, request, "completions")
        if body.stream:
            return sse(_chunks(events, cid, created, model, echo, body))
        choices = await relay.collect(events, request, body.n)
    except relay.ClientGone:
        return None
    finished = [c.finish for c in choices if c.finish is not None]
    return CompletionResponse(
        id=cid,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=echo + c.text,
                logprobs=_logprobs(c.logprobs, len(echo)) if body.logprobs is not None else None,
                finish_reason=relay.finish_reason(c.finish),
            )
            for i, c in enumerate(choices)
        ],
        usage=usage(finished),
    )


async def _chunks(
    events: AsyncIterator[Event],
    cid: str,
    created: int,
    model: str,
    echo: str,
    body: CompletionRequest,
) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(
        index: int, text: str, logprobs: dict[str, Any] | None = None, finish: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            ],
            **({"usage": None} if include_usage else {}),
        }

    echoed: set[int] = set()
    finished: list[Finished] = []
    async for ev in events:
        if not isinstance(ev, Delta | Finished):
            continue
        head = ""
        if echo and ev.index not in echoed:
            echoed.add(ev.index)
            head = echo
        if isinstance(ev, Delta):
            lp = None
            if body.logprobs is not None:
                lp = _logprobs(list(ev.logprobs), len(echo)).model_dump()
            yield chunk(ev.index, head + ev.text, lp)
        else:
            finished.append(ev)
            if head:
                yield chunk(ev.index, head)
            yield chunk(ev.index, "", None, relay.finish_reason(ev))
    if include_usage:
        yield {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(finished).model_dump(),
        }
