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

from server.api.openai.responses_protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ErrorEvent,
    FunctionCall,
    ItemStatus,
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
    new_id,
)
from server.api.sse import EventStream, event_frame
from server.errors import CodeserveError

log = logging.getLogger(__name__)


@dataclass
class Sequencer:
    """Numbers events as OpenAI does: ``sequence_number`` counts up from 0 across the stream."""

    n: int = field(default=0)

    def __call__(self) -> int:
        self.n += 1
        return self.n - 1


def _added(seq: Sequencer, index: int, item: OutputItem) -> OutputItemEvent:
    return OutputItemEvent(
        type="response.output_item.added", sequence_number=seq(), output_index=index, item=item
    )


def _done(seq: Sequencer, index: int, item: OutputItem) -> OutputItemEvent:
    return OutputItemEvent(
        type="response.output_item.done", sequence_number=seq(), output_index=index, item=item
    )


class OutputBuilder:
    """Builds the output items from content text and tool calls as they are found, and the
    stream events that announce them; the non-streamed answer is built the same way, so both
    carry the same items."""

    def __init__(self, seq: Sequencer) -> None:
        self.seq = seq
        self.items: list[OutputItem] = []
        self._open = False  # the last item is still being written

    def content(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if not (self._open and isinstance(self.items[-1], OutputMessage)):
            events += self._close("completed")
            events += self._open_message()
        if not text:
            return events
        message = self.items[-1]
        assert isinstance(message, OutputMessage)
        message.content[0].text += text
        index = len(self.items) - 1
        delta = TextDeltaEvent(
            sequence_number=self.seq(), item_id=message.id, output_index=index, delta=text
        )
        return [*events, delta]

    def call(self, call_id: str, name: str) -> list[StreamEvent]:
        events = self._close("completed")
        item = FunctionCall(
            id=new_id("fc"), call_id=call_id, name=name, arguments="", status="in_progress"
        )
        self.items.append(item)
        self._open = True
        return [*events, _added(self.seq, len(self.items) - 1, item.model_copy())]

    def arguments(self, text: str) -> list[StreamEvent]:
        item = self.items[-1]
        assert self._open and isinstance(item, FunctionCall)
        item.arguments += text
        index = len(self.items) - 1
        return [
            ArgumentsDeltaEvent(
                sequence_number=self.seq(), item_id=item.id, output_index=index, delta=text
            )
        ]

    def finish(self, status: ItemStatus) -> list[StreamEvent]:
        """Closes the last item with ``status``; an answer with no items gets an empty message."""
        events = [] if self.items else self._open_message()
        return events + self._close(status)

    def _open_message(self) -> list[StreamEvent]:
        item = OutputMessage(id=new_id("msg"), status="in_progress", content=[OutputText(text="")])
        self.items.append(item)
        self._open = True
        index = len(self.items) - 1
        added = _added(self.seq, index, item.model_copy(update={"content": []}))
        part = ContentPartEvent(
            type="response.content_part.added",
            sequence_number=self.seq(),
            item_id=item.id,
            output_index=index,
            part=OutputText(text=""),
        )
        return [added, part]

    def _close(self, status: ItemStatus) -> list[StreamEvent]:
        if not self._open:
            return []
        self._open = False
        index, item = len(self.items) - 1, self.items[-1]
        item.status = status
        seq = self.seq
        if isinstance(item, FunctionCall):
            done = ArgumentsDoneEvent(
                sequence_number=seq(), item_id=item.id, output_index=index, arguments=item.arguments
            )
            return [done, _done(seq, index, item.model_copy(deep=True))]
        part = item.content[0]
        return [
            TextDoneEvent(
                sequence_number=seq(), item_id=item.id, output_index=index, text=part.text
            ),
            ContentPartEvent(
                type="response.content_part.done",
                sequence_number=seq(),
                item_id=item.id,
                output_index=index,
                part=part.model_copy(),
            ),
            _done(seq, index, item.model_copy(deep=True)),
        ]


def lifecycle(seq: Sequencer, kind: str, response: Response) -> ResponseEvent:
    return ResponseEvent(type=kind, sequence_number=seq(), response=response)  # type: ignore[arg-type]


def final_event(seq: Sequencer, response: Response) -> ResponseEvent:
    kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
    return lifecycle(seq, kind, response)


async def frames(
    events: AsyncIterator[StreamEvent],
    seq: Sequencer,
    failed: Callable[[ResponseError], Response],
) -> AsyncIterator[bytes]:
    """``event: <type>`` / ``data: <json>`` frames; a failure mid-stream ends it cleanly."""

    def frame(ev: StreamEvent) -> bytes:
        return event_frame(ev.type, json.dumps(ev.model_dump(by_alias=True), separators=(",", ":")))

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
) -> EventStream:
    return EventStream(frames(events, seq, failed))
