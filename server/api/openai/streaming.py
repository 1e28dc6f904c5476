"""OpenAI's stream framing and usage block, shared by its completion routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse

from server.api.openai.protocol import PromptTokensDetails, Usage
from server.engine.base import Finished
from server.errors import CodeserveError


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


def sse(chunks: AsyncIterator[dict]) -> EventSourceResponse:
    """OpenAI's stream framing: ``data: {json}`` events, then ``data: [DONE]``."""

    async def frames() -> AsyncIterator[dict]:
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk, separators=(",", ":"))}
        except CodeserveError as e:  # after the headers went out, an error is one more event
            yield {
                "data": json.dumps(
                    {
                        "error": {
                            "message": e.message,
                            "type": e.error_type,
                            "param": e.param,
                            "code": e.code,
                        }
                    }
                )
            }
        yield {"data": "[DONE]"}

    return EventSourceResponse(frames(), sep="\n", ping=15)
