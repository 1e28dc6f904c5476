"""POST /v1/chat/completions: the GGUF's own chat template renders the prompt."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, cast

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api import relay
from server.api.openai import constraints, params
from server.api.openai.chat_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    FunctionCallOut,
    ToolCallOut,
    TopLogprob,
)
from server.api.openai.constraints import ToolPlan
from server.api.openai.protocol import (
    FimCompletionRequest,
    new_id,
    now,
)
from server.api.openai.streaming import documented, sse, usage
from server.core.budget import completion_budget
from server.core.chat import render_chat
from server.core.prompt_size import check_prompt_bytes
from server.core.tools import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Function,
    ToolCallParser,
    ToolEvent,
    detect_format,
)
from server.engine.base import Delta, Engine, Event, Finished, GenerationRequest, TokenLogprob
from server.scheduler import ModelWorker

# What a route returns: a JSON body, an SSE stream, or nothing for a client that left.
Answer = ChatCompletionResponse | Response | None

router = APIRouter()


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:  # templates that know participant (or tool) names render it
        out["name"] = m.name
    return out


async def render_prompt(
    engine: Engine, body: ChatCompletionRequest, plan: ToolPlan | None = None
) -> list[int]:
    """The prompt's token ids; rendering and tokenizing run off the event loop."""
    messages = [_message(m) for m in body.messages]
    functions = plan.functions if plan else ()
    return await relay.blocking(_checked_prompt, engine, messages, functions)


def _checked_prompt(
    engine: Engine, messages: list[dict[str, Any]], functions: Sequence[Function]
) -> list[int]:
    """chat_prompt with a size check between template and tokens: a prompt too big for the
    context is refused from its byte length (see server.core.prompt_size)."""
    text, has_bos = render_chat(engine.info, messages, functions)
    check_prompt_bytes(engine, text, param="messages")
    return engine.tokenize(text, add_bos=not has_bos)


def _chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.token.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                    for t, lp in e.top.items()
                ],
            )
            for e in entries
        ]
    )


@router.post(
    "/v1/chat/completions", response_model=None, responses=documented(ChatCompletionResponse)
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Answer:
    worker = await relay.model_worker(request, body.model, keep_alive=body.keep_alive)
    info = worker.engine.info
    plan = constraints.tool_plan(body)
    gbnf = constraints.chat_grammar(body, plan, detect_format(info.chat_template))
    prompt = await render_prompt(worker.engine, body, plan)
    wanted = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=completion_budget(info.n_ctx, len(prompt), wanted),
        sampling=params.sampling_params(body),
        stop=tuple(body.stop),
        n=body.n,
        logprobs=top,
        time_budget_s=params.time_budget(body),
        speculation=params.speculation(body),
        grammar=gbnf,
        logit_bias=constraints.logit_bias(body, info.n_vocab),
        ignore_eos=constraints.check_ignore_eos(body, gbnf),
        stream=body.stream,
    )
    return await respond(worker, greq, request, body, label="chat", tools=plan)


ChatFinish = Literal["stop", "length", "tool_calls"]


def _finish(f: Finished | None, parser: ToolCallParser | None) -> ChatFinish | None:
    reason = cast(ChatFinish | None, relay.finish_reason(f))
    if parser is not None and parser.calls and reason == "stop" and not parser.incomplete:
        return "tool_calls"
    return reason


def _parser(tools: ToolPlan | None) -> ToolCallParser | None:
    return ToolCallParser(tools.functions, parallel=tools.parallel) if tools else None


async def respond(
    worker: ModelWorker,
    greq: GenerationRequest,
    request: Request,
    body: ChatCompletionRequest | FimCompletionRequest,
    *,
    label: str,
    tools: ToolPlan | None = None,
) -> Answer:
    """Answer in chat-completion shape (also what Mistral's /v1/fim/completions returns)."""
    cid, created, model = new_id("chatcmpl"), now(), worker.name
    try:
        events = await relay.start(worker, greq, request, label)
        if body.stream:
            lp = greq.logprobs is not None
            return sse(_chunks(events, cid, created, model, body, lp, tools))
        choices = await relay.collect(events, request, greq.n)
    except relay.ClientGone:
        return None
    out = []
    for i, c in enumerate(choices):
        parser = _parser(tools)
        message = AssistantMessage(content=c.text)
        if parser is not None:
            parser.feed(c.text)
            parser.finish()
            message = AssistantMessage(
                content=parser.content if parser.content or not parser.calls else None,
                tool_calls=[
                    ToolCallOut(
                        id=t.id, function=FunctionCallOut(name=t.name, arguments=t.arguments)
                    )
                    for t in parser.calls
                ]
                or None,
            )
        out.append(
            ChatChoice(
                index=i,
                message=message,
                logprobs=_chat_logprobs(c.logprobs) if greq.logprobs is not None else None,
                finish_reason=_finish(c.finish, parser),
            )
        )
    return ChatCompletionResponse(
        id=cid,
        created=created,
        model=model,
        choices=out,
        usage=usage([c.finish for c in choices if c.finish is not None]),
    )


def _delta(ev: ToolEvent) -> dict[str, Any]:
    """A tool parser's event as OpenAI's chunk delta: a call's id, type and name come first,
    then fragments of its arguments that concatenate to the final ``arguments``."""
    if isinstance(ev, ContentDelta):
        return {"content": ev.text}
    if isinstance(ev, CallStart):
        fn = {"name": ev.name, "arguments": ""}
        return {
            "tool_calls": [{"index": ev.index, "id": ev.id, "type": "function", "function": fn}]
        }
    assert isinstance(ev, ArgumentsDelta)
    return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}


async def _chunks(
    events: AsyncIterator[Event],
    cid: str,
    created: int,
    model: str,
    body: ChatCompletionRequest | FimCompletionRequest,
    logprobs: bool,
    tools: ToolPlan | None = None,
) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(
        index: int, delta: dict[str, Any], lp: Any = None, finish: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            **({"usage": None} if include_usage else {}),
        }

    started: set[int] = set()
    parsers: dict[int, ToolCallParser | None] = {}
    finished: list[Finished] = []
    async for ev in events:
        assert isinstance(ev, Delta | Finished)  # a generation request's events
        if ev.index not in started:  # OpenAI opens every choice with the role
            started.add(ev.index)
            parsers[ev.index] = _parser(tools)
            yield chunk(ev.index, {"role": "assistant", "content": ""})
        parser = parsers[ev.index]
        if isinstance(ev, Delta):
            lp = _chat_logprobs(list(ev.logprobs)).model_dump() if logprobs else None
            if parser is None:
                yield chunk(ev.index, {"content": ev.text}, lp)
                continue
            deltas = [_delta(e) for e in parser.feed(ev.text)]
            for j, d in enumerate(deltas or ([{}] if lp else [])):
                yield chunk(ev.index, d, lp if j == 0 else None)
        else:
            finished.append(ev)
            for e in parser.finish() if parser else []:
                yield chunk(ev.index, _delta(e))
            yield chunk(ev.index, {}, None, _finish(ev, parser))
    if include_usage:
        yield {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(finished).model_dump(),
        }
