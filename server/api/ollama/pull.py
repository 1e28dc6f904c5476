"""POST /api/pull: fetch a registry entry (as `codeserve pull` does) with Ollama's progress lines.

The store fetches a whole file at once (pip or huggingface-hub), so progress is Ollama's status
lines with one total/completed pair when the file is in place; while a fetch runs, the status
line repeats so clients see the pull alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api.ollama import modelinfo, names
from server.api.ollama.answer import one
from server.api.ollama.protocol import Progress, PullRequest
from server.api.ollama.streaming import STREAMED, ndjson

router = APIRouter()

_HEARTBEAT_S = 2.0


@router.post("/api/pull", response_model=None, responses=STREAMED)
async def pull(body: PullRequest, request: Request) -> Response:
    manager = request.app.state.manager
    name = names.resolve(manager.registry, body.model or body.name)
    cfg = manager.config(name)
    store = manager.store

    async def progress() -> AsyncIterator[Progress]:
        yield Progress(status="pulling manifest")
        # The fetch finishes into the cache even if the client leaves: a later pull is instant.
        fetch = asyncio.ensure_future(asyncio.to_thread(store.pull, cfg))
        while not (await asyncio.wait({fetch}, timeout=_HEARTBEAT_S))[0]:
            yield Progress(status=f"pulling {name}")
        path = fetch.result()  # a ModelUnavailable becomes the stream's error line
        size = path.stat().st_size
        digest = modelinfo.digest(path, getattr(cfg.source, "sha256", None))
        yield Progress(
            status=f"pulling {digest[:12]}", digest=f"sha256:{digest}", total=size, completed=size
        )
        yield Progress(status="verifying sha256 digest")
        yield Progress(status="writing manifest")
        yield Progress(status="success")

    if body.stream is False:
        last = Progress(status="success")
        async for p in progress():
            last = p
        return one(last)
    return ndjson(progress())
