"""OpenAI's stream framing and usage block, shared by its completion routes."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from server.api.errors import ApiError
from server.api.openai.protocol import ErrorBody, ErrorResponse, PromptTokensDetails, Usage
from server.api.sse import EventStream, data_frame
from server.engine.base import Finished
from server.errors import CodeserveError

log = logging.getLogger(__name__)


# One server-sent event, as Open API before 3.2 reads a text/event-stream schema.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A JSON chunk, or an error envelope after a failure, then `[DONE]`",
        }
    },
}


def documented(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route that answers ``model``, or a stream when asked."""
    return {
        200: {
            "model": model,
            "description": "The completion; with `stream: true`, server-sent events of chunks, "
            "then `data: [DONE]`",
            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
        }
    }


def usage(finished: list[Finished]) -> Usage:
    prompt = finished[0].timings.prompt_tokens if finished else 0
    cached = finished[0].timings.cached_tokens if finished else 0
    completion = sum(f.timings.completion_tokens for f in finished)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def _error_event(err: ApiError) -> bytes:
    body = ErrorResponse(
        error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code)
    )
    # ensure_ascii: a lone surrogate echoed in a message cannot break the stream's encoding.
    return data_frame(json.dumps(body.model_dump(), separators=(",", ":")))


def sse(chunks: AsyncIterator[dict[str, Any]]) -> EventStream:
    """OpenAI's stream framing: ``data: {json}`` events, then ``data: [DONE]``.

    Once the headers are out an error can no longer be a status code: whatever goes wrong becomes
    one error event in OpenAI's envelope, and the stream still ends with ``[DONE]`` so clients
    never see a stream cut short.
    """

    async def frames() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield data_frame(json.dumps(chunk, separators=(",", ":")))
        except CodeserveError as e:
            yield _error_event(ApiError.of(e))
        except Exception as e:
            log.exception("stream failed after its headers were sent")
            yield _error_event(ApiError.unexpected(e))
        yield data_frame("[DONE]")

    return EventStream(frames())
