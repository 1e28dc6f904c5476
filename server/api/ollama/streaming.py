"""Ollama's stream framing: one JSON object per line (``application/x-ndjson``).

Once the first line went out the status is 200, so a later failure becomes one more line,
``{"error": "..."}``, which Ollama's clients raise; the stream is never just cut.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.errors import CodeserveError

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"

# The OpenAPI entry of a route that streams unless the request says "stream": false: both bodies.
STREAMED: dict[int | str, dict[str, object]] = {
    200: {
        "description": 'One JSON object per line, or one object when "stream" is false',
        "content": {NDJSON: {}, "application/json": {}},
    }
}


def line(obj: BaseModel) -> bytes:
    return obj.model_dump_json(exclude_none=True).encode() + b"\n"


def ndjson(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield line(chunk)
        except CodeserveError as e:
            yield _error_line(e.message)
        except Exception as e:  # the status is already 200: say what happened in the stream
            log.exception("Ollama stream failed")
            yield _error_line(f"internal error: {type(e).__name__}: {e}")

    return StreamingResponse(lines(), media_type=NDJSON)


def _error_line(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"
