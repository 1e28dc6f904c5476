"""Running the app under uvicorn with a shutdown that loses nothing.

uvicorn's own graceful shutdown waits for open connections, then cancels them; a stream that is
still generating would be cut without a finish reason (and sse-starlette cuts its streams as soon
as the signal arrives unless told not to). Before that, the model manager drains:
it stops admitting, fails what is queued, lets running requests finish for
``shutdown_drain_s`` and then cancels them, so every stream ends with an error event and its end
marker, and the process exits within the bound.
"""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from server.settings import ServerSettings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float):
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._app.state.manager.drain(self._drain_s)
        AppStatus.should_exit = True  # every stream has ended; any straggler may now be cut
        await super().shutdown(sockets)


def make_server(app: FastAPI, settings: ServerSettings, **uvicorn_options: Any) -> DrainingServer:
    # sse-starlette would cut every stream the moment the signal arrives, before the drain.
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # After the drain every stream has ended: what is left is closing connections.
        timeout_graceful_shutdown=2,
        **uvicorn_options,
    )
    return DrainingServer(config, app, settings.shutdown_drain_s)
