"""Server-sent events as every streaming dialect sends them.

sse-starlette (pinned) keeps what a stream needs besides its frames: pings, noticing a client
that left, the headers. Two costs it adds per frame are skipped, because a stream sends one
frame per token and the event loop's time per token competes with llama.cpp's threads for the
cores: frames arrive already encoded (it would otherwise build and encode a ``ServerSentEvent``
for each), and a send without a timeout is not wrapped in a cancel scope (which, with no timeout
set, could never fire).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.types import Message, Send

PING_S = 15


def data_frame(data: str) -> bytes:
    """One ``data:`` event; ``data`` is one line (compact JSON, or ``[DONE]``)."""
    return b"data: " + _utf8(data) + b"\n\n"


def event_frame(event: str, data: str) -> bytes:
    """One named event (OpenAI's Responses API names every event by its type)."""
    return b"event: " + _utf8(event) + b"\ndata: " + _utf8(data) + b"\n\n"


def _utf8(text: str) -> bytes:
    # A lone surrogate (a request's "\ud800" echoed in an error) must not cut the stream.
    return text.encode("utf-8", "replace")


class EventStream(EventSourceResponse):
    def __init__(self, frames: AsyncIterator[bytes]):
        super().__init__(frames, sep="\n", ping=PING_S)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)
