"""The Responses API event stream: OpenAI's event sequence over the engine's Delta/Finished events.

created → in_progress → per output item: output_item.added, (content_part.added, output_text
deltas, output_text.done, content_part.done | function_call_arguments delta/done),
output_item.done → completed or incomplete. An error after the headers went out is an ``error``
event followed by ``response.failed``, so the client always sees the stream end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from sse_starlette import EventSourceResponse

from server.api.openai.responses_protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ErrorEvent,
    FunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    Response,
    ResponseError,
    ResponseEvent,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from server.errors import CodeserveError

log = logging.getLogger(__name__)


@dataclass
class Sequencer:
    """Numbers events as OpenAI does: ``sequence_number`` counts up from 0 across the stream."""

    n: int = field(default=0)

    def __call__(self) -> int:
        self.n += 1
        return self.n - 1


def message_opening(seq: Sequencer, index: int, item: OutputMessage) -> list[StreamEvent]:
    opened = item.model_copy(update={"status": "in_progress", "content": []})
    return [
        OutputItemEvent(
            type="response.output_item.added",
            sequence_number=seq(),
            output_index=index,
            item=opened,
        ),
        ContentPartEvent(
            type="response.content_part.added",
            sequence_number=seq(),
            item_id=item.id,
            output_index=index,
            part=OutputText(text=""),
        ),
    ]


def text_delta(seq: Sequencer, index: int, item_id: str, text: str) -> TextDeltaEvent:
    return TextDeltaEvent(sequence_number=seq(), item_id=item_id, output_index=index, delta=text)


def message_closing(seq: Sequencer, index: int, item: OutputMessage) -> list[StreamEvent]:
    part = item.content[0]
    return [
        TextDoneEvent(sequence_number=seq(), item_id=item.id, output_index=index, text=part.text),
        ContentPartEvent(
            type="response.content_part.done",
            sequence_number=seq(),
            item_id=item.id,
            output_index=index,
            part=part,
        ),
        OutputItemEvent(
            type="response.output_item.done", sequence_number=seq(), output_index=index, item=item
        ),
    ]


def function_call_events(seq: Sequencer, index: int, item: FunctionCall) -> list[StreamEvent]:
    opened = item.model_copy(update={"status": "in_progress", "arguments": ""})
    return [
        OutputItemEvent(
            type="response.output_item.added",
            sequence_number=seq(),
            output_index=index,
            item=opened,
        ),
        ArgumentsDeltaEvent(
            sequence_number=seq(), item_id=item.id, output_index=index, delta=item.arguments
        ),
        ArgumentsDoneEvent(
            sequence_number=seq(), item_id=item.id, output_index=index, arguments=item.arguments
        ),
        OutputItemEvent(
            type="response.output_item.done", sequence_number=seq(), output_index=index, item=item
        ),
    ]


def whole_item_events(seq: Sequencer, index: int, item: OutputItem) -> list[StreamEvent]:
    """Every event of an item known in full (output that was parsed after generation)."""
    if isinstance(item, FunctionCall):
        return function_call_events(seq, index, item)
    events = message_opening(seq, index, item)
    if item.content[0].text:
        events.append(text_delta(seq, index, item.id, item.content[0].text))
    return events + message_closing(seq, index, item)


def lifecycle(seq: Sequencer, kind: str, response: Response) -> ResponseEvent:
    return ResponseEvent(type=kind, sequence_number=seq(), response=response)  # type: ignore[arg-type]


def final_event(seq: Sequencer, response: Response) -> ResponseEvent:
    kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
    return lifecycle(seq, kind, response)


async def frames(
    events: AsyncIterator[StreamEvent],
    seq: Sequencer,
    failed: Callable[[ResponseError], Response],
) -> AsyncIterator[dict[str, str]]:
    """``event: <type>`` / ``data: <json>`` frames; a failure mid-stream ends it cleanly."""

    def frame(ev: StreamEvent) -> dict[str, str]:
        return {"event": ev.type, "data": json.dumps(ev.model_dump(), separators=(",", ":"))}

    try:
        async for ev in events:
            yield frame(ev)
    except Exception as e:  # after the headers went out, an error is one more event
        if isinstance(e, CodeserveError):
            code, message, param = e.code or e.error_type, e.message, e.param
        else:
            log.exception("responses stream failed")
            code, message, param = "server_error", f"{type(e).__name__}: {e}", None
        yield frame(ErrorEvent(sequence_number=seq(), code=code, message=message, param=param))
        yield frame(
            lifecycle(seq, "response.failed", failed(ResponseError(code=code, message=message)))
        )


def sse(
    events: AsyncIterator[StreamEvent],
    seq: Sequencer,
    failed: Callable[[ResponseError], Response],
) -> EventSourceResponse:
    return EventSourceResponse(frames(events, seq, failed), sep="\n", ping=15)
