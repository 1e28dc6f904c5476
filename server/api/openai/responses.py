"""POST /v1/responses (OpenAI's Responses API) over the same generation core as chat completions.

``input`` items become chat messages rendered with the GGUF's chat template; output is a
``message`` item (output_text), or ``function_call`` items when the model calls a tool.
Responses are kept in memory (``responses_store``) so ``previous_response_id`` works.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request

from server.api import relay
from server.api.openai import params
from server.api.openai.responses_input import (
    Message,
    function_tools,
    input_messages,
    refuse_unsupported,
)
from server.api.openai.responses_protocol import (
    DeletedResponse,
    FunctionCall,
    FunctionTool,
    IncompleteDetails,
    InputTokensDetails,
    OutputItem,
    OutputMessage,
    Reasoning,
    Response,
    ResponseCreateRequest,
    ResponseError,
    ResponseStatus,
    ResponseUsage,
    StreamEvent,
    TextConfig,
    new_id,
    now,
)
from server.api.openai.responses_store import ResponseNotFound, ResponseStore, Stored
from server.api.openai.responses_stream import (
    OutputBuilder,
    Sequencer,
    final_event,
    lifecycle,
    sse,
)
from server.api.openai.responses_tools import OutputPlan, Splitter, plan_output
from server.api.sse import EventStream
from server.core.budget import completion_budget
from server.core.chat import render_chat
from server.engine.base import Delta, Engine, Event, Finished, GenerationRequest
from server.errors import ContextOverflow, InvalidRequest

router = APIRouter()


def _store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store


def render_prompt(engine: Engine, messages: list[Message], plan: OutputPlan) -> list[int]:
    try:
        text, has_bos = render_chat(engine.info, messages, plan.functions)
    except InvalidRequest as e:  # the messages came from `input`: name it
        raise InvalidRequest(e.message, param="input") from e
    return engine.tokenize(text, add_bos=not has_bos)


@dataclass
class Answer:
    """One response being built: its fixed fields, and the conversation it continues."""

    body: ResponseCreateRequest
    tools: list[FunctionTool]
    model: str
    conversation: list[Message]
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=now)

    def response(
        self,
        status: ResponseStatus,
        output: list[OutputItem] | None = None,
        finished: Finished | None = None,
        error: ResponseError | None = None,
    ) -> Response:
        body = self.body
        usage = None
        if finished is not None:
            t = finished.timings
            usage = ResponseUsage(
                input_tokens=t.prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=t.cached_tokens),
                output_tokens=t.completion_tokens,
                total_tokens=t.prompt_tokens + t.completion_tokens,
            )
        return Response(
            id=self.id,
            created_at=self.created_at,
            status=status,
            error=error,
            incomplete_details=(
                IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
            ),
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=self.model,
            output=output or [],
            parallel_tool_calls=body.parallel_tool_calls is not False,
            previous_response_id=body.previous_response_id,
            reasoning=Reasoning(),
            store=body.store is not False,
            temperature=body.temperature,
            text=body.text or TextConfig(),
            tool_choice=body.tool_choice,
            tools=self.tools,
            top_p=body.top_p,
            usage=usage,
            metadata=body.metadata or {},
            user=body.user,
        )

    def failed(self, error: ResponseError) -> Response:
        return self.response("failed", error=error)

    def finish(
        self, output: list[OutputItem], finished: Finished | None, store: ResponseStore
    ) -> Response:
        """The final response object; stored for previous_response_id unless store=false."""
        status: ResponseStatus = (
            "completed" if finished is not None and finished.reason == "stop" else "incomplete"
        )
        response = self.response(status, output, finished)
        if self.body.store is not False:
            store.put(Stored(response, tuple(self.conversation + assistant_turn(output))))
        return response


def assistant_turn(output: list[OutputItem]) -> list[Message]:
    """The output items as chat messages, for the next turn of a stored conversation."""
    text = "".join(p.text for i in output if isinstance(i, OutputMessage) for p in i.content)
    calls = [
        {
            "id": i.call_id,
            "type": "function",
            "function": {"name": i.name, "arguments": i.arguments},
        }
        for i in output
        if isinstance(i, FunctionCall)
    ]
    message: Message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return [message]


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponseCreateRequest, request: Request
) -> Response | EventStream | None:
    refuse_unsupported(body)
    tools = function_tools(body.tools)
    store = _store(request)
    history = store.history(body.previous_response_id) if body.previous_response_id else []
    conversation = history + input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    worker = await relay.model_worker(request, body.model, keep_alive=body.keep_alive)
    # Grammar building, template rendering and tokenizing are CPU work: off the event loop.
    plan = await asyncio.to_thread(plan_output, worker.engine.info, body, tools)
    prompt = await asyncio.to_thread(render_prompt, worker.engine, system + conversation, plan)
    try:
        budget = completion_budget(worker.engine.info.n_ctx, len(prompt), body.max_output_tokens)
    except ContextOverflow as e:
        raise ContextOverflow(e.message, param="input") from e
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=budget,
        sampling=params.sampling_params(body),
        stop=tuple(body.stop),
        time_budget_s=params.time_budget(body),
        speculation=params.speculation(body),
        grammar=plan.grammar,
        stream=body.stream,
    )
    answer = Answer(body, tools, worker.name, conversation)
    try:
        events = await relay.start(worker, greq, request, "responses")
        if body.stream:
            seq = Sequencer()
            return sse(_stream(events, answer, plan, store, seq), seq, answer.failed)
        (choice,) = await relay.collect(events, request, 1)
    except relay.ClientGone:
        return None
    splitter = Splitter(plan, OutputBuilder(Sequencer()))
    splitter.feed(choice.text)
    splitter.finish(choice.finish)
    return answer.finish(splitter.builder.items, choice.finish, store)


async def _stream(
    events: AsyncIterator[Event],
    answer: Answer,
    plan: OutputPlan,
    store: ResponseStore,
    seq: Sequencer,
) -> AsyncIterator[StreamEvent]:
    yield lifecycle(seq, "response.created", answer.response("in_progress"))
    yield lifecycle(seq, "response.in_progress", answer.response("in_progress"))
    splitter, finished = Splitter(plan, OutputBuilder(seq)), None
    async for e in events:
        if isinstance(e, Delta):
            for ev in splitter.feed(e.text):
                yield ev
        elif isinstance(e, Finished):
            finished = e
    for ev in splitter.finish(finished):
        yield ev
    yield final_event(seq, answer.finish(splitter.builder.items, finished, store))


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(response_id: str, request: Request) -> Response:
    stored = _store(request).get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.response


@router.delete("/v1/responses/{response_id}", response_model=None)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    if not _store(request).delete(response_id):
        raise _not_found(response_id)
    return DeletedResponse(id=response_id)


def _not_found(response_id: str) -> ResponseNotFound:
    return ResponseNotFound(f"No response found with id {response_id!r}.", param="response_id")
