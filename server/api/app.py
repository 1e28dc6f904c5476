"""The FastAPI application: routers, error rendering, and the model manager's lifetime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

from fastapi import Depends, FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api import auth, errors, guards, health, relay
from server.api.llamacpp import errors as llamacpp_errors
from server.api.llamacpp import routes as llamacpp
from server.api.ollama import chat as ollama_chat
from server.api.ollama import embed as ollama_embed
from server.api.ollama import errors as ollama_errors
from server.api.ollama import generate as ollama_generate
from server.api.ollama import models as ollama_models
from server.api.ollama import pull as ollama_pull
from server.api.openai import (
    chat,
    completions,
    embeddings,
    fim,
    lifecycle,
    models,
    responses,
)
from server.api.openai import errors as openai_errors
from server.api.openai.protocol import ErrorResponse
from server.api.openai.responses_store import ResponseStore
from server.api.request_count import RequestCounter
from server.engine.factory import make_engine_factory
from server.manager import EngineFactory, ModelManager
from server.metrics import Metrics
from server.registry import Registry
from server.settings import ServerSettings

log = logging.getLogger(__name__)


def create_app(
    settings: ServerSettings,
    registry: Registry,
    engine_factory: EngineFactory | None = None,
    on_startup_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """``on_startup_failure(reason)`` is called when the default or a ``preload`` model cannot
    be loaded; ``codeserve serve`` then stops. Without it the error is only reported by /health.
    """
    if engine_factory is None:
        engine_factory = make_engine_factory(
            settings.engine,
            settings.slots,
            settings.prefill_chunk,
            settings.prompt_cache(),
            settings.stream_frame_ms,
        )
    metrics = Metrics()
    manager = ModelManager(registry, settings, engine_factory, metrics)
    metrics.watch(manager.state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background so /health can answer 503 "loading" meanwhile.
        preload = [manager.default_model] + [
            m.name
            for m in registry.models.values()
            if m.preload and m.name != manager.default_model
        ]
        task = asyncio.create_task(_preload(manager, preload, on_startup_failure))
        yield
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await manager.close()

    # fastapi-offline: the same FastAPI, with /docs and /redoc served from files it ships instead
    # of a CDN, so the docs work on a machine without network access.
    app = FastAPIOffline(title="codeserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.manager = manager
    app.state.metrics = metrics
    app.state.responses = ResponseStore()  # for /v1/responses' previous_response_id
    # Dialects other than OpenAI's add (path prefix, renderer) pairs here.
    respond = errors.install(
        app,
        default=openai_errors.render,
        by_prefix=[
            ("/api/", ollama_errors.render),
            *((p, llamacpp_errors.render) for p in llamacpp_errors.PREFIXES),
        ],
    )
    # ... and (path prefix, error envelope model) pairs here, for the OpenAPI document.
    errors.document(
        app,
        default=ErrorResponse,
        by_prefix=[
            ("/api/", ollama_errors.OllamaError),
            *((p, llamacpp_errors.LlamaServerError) for p in llamacpp_errors.PREFIXES),
        ],
    )
    app.add_middleware(relay.ModelLeases, manager=manager)
    v1 = [Depends(auth.require_api_key)]

    app.add_middleware(RequestCounter, metrics=metrics)

    @app.get("/metrics", include_in_schema=False, dependencies=v1)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(completions.router, dependencies=v1)
    app.include_router(chat.router, dependencies=v1)
    app.include_router(fim.router, dependencies=v1)
    app.include_router(lifecycle.router, dependencies=v1)
    app.include_router(models.router, dependencies=v1)
    app.include_router(embeddings.router, dependencies=v1)
    app.include_router(responses.router, dependencies=v1)
    for ollama in (ollama_generate, ollama_chat, ollama_models, ollama_pull, ollama_embed):
        app.include_router(ollama.router, dependencies=v1)
    app.include_router(ollama_models.root_router)
    app.include_router(llamacpp.router, dependencies=v1)
    app.include_router(health.router)

    # Added last, so they run first: a refused request touches nothing else.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(
        guards.BodyLimit, respond=respond, max_bytes=int(settings.max_body_mb * (1 << 20))
    )
    app.add_middleware(
        guards.HostGuard,
        respond=respond,
        bound_host=settings.host,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=[*settings.allowed_origins, *settings.cors_origins],
    )
    return app


async def _preload(
    manager: ModelManager, names: list[str], on_failure: Callable[[str], None] | None
) -> None:
    for name in names:
        try:
            await manager.get(name)
            log.info("model %s ready", name)
        except Exception as e:  # recorded in manager.load_errors, reported by /health
            log.error("could not load model %s: %s", name, e)
            if on_failure is not None:
                reason = str(e).removeprefix(f"model {name!r}: ")
                on_failure(f"could not load model {name!r}: {reason}")
                return
