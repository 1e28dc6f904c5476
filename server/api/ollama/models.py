"""Ollama's model routes: GET /api/tags, POST /api/show, GET /api/ps, GET /api/version, GET /."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server import __version__
from server.api import relay
from server.api.ollama import modelinfo, names
from server.api.ollama.protocol import (
    OLLAMA_API_VERSION,
    ListedModel,
    RunningModel,
    ShowRequest,
    ShowResponse,
    timestamp,
)
from server.engine.base import Engine
from server.engine.fim import FAMILIES
from server.errors import ModelUnavailable
from server.registry import ModelConfig

router = APIRouter()
root_router = APIRouter()  # GET / and HEAD /: how Ollama clients check that a server is up

# Ollama's "never expires" is now + the largest Go duration (about 292 years).
_FOREVER_S = 292 * 365 * 86400


@root_router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def ollama_is_running() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> JSONResponse:
    return JSONResponse({"version": OLLAMA_API_VERSION, "codeserve": __version__})


def _sha(cfg: ModelConfig) -> str | None:
    return getattr(cfg.source, "sha256", None)


async def _info(path: Path, cfg: ModelConfig) -> modelinfo.FileInfo:
    return await asyncio.to_thread(modelinfo.file_info, path, _sha(cfg))


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(request: Request) -> JSONResponse:
    """Models whose GGUF is on disk (as Ollama lists pulled models); `codeserve models` shows
    the rest of the registry."""
    manager = request.app.state.manager
    listed = []
    for name, cfg in manager.registry.models.items():
        path = manager.store.local_path(cfg)
        if path is None:
            continue
        info = await _info(path, cfg)
        listed.append(
            ListedModel(
                name=names.tagged(name),
                model=names.tagged(name),
                modified_at=timestamp(path.stat().st_mtime),
                size=path.stat().st_size,
                digest=info.digest,
                details=modelinfo.details(info),
            ).model_dump()
        )
    return JSONResponse({"models": listed})


def go_template(engine: Engine) -> str:
    """The prompt template in Ollama's Go-template terms. Clients (Continue) turn fill-in-the-middle
    on when it mentions .Suffix, so it does exactly when the model has FIM tokens."""
    fim = engine.info.fim
    if fim is None:
        return engine.info.chat_template or "{{ .Prompt }}"
    fam = FAMILIES.get(fim.family)
    pre, suf, mid = (
        (fam.prefix, fam.suffix, fam.middle)
        if fam is not None
        # control tokens may detokenize to nothing: name them by id rather than hide them
        else tuple(
            engine.detokenize([t]) or f"<token {t}>" for t in (fim.prefix, fim.suffix, fim.middle)
        )
    )
    return (
        f"{{{{- if .Suffix }}}}{pre}{{{{ .Prompt }}}}{suf}{{{{ .Suffix }}}}{mid}"
        "{{- else }}{{ .Prompt }}{{- end }}"
    )


@router.post("/api/show")
async def show(body: ShowRequest, request: Request) -> JSONResponse:
    manager = request.app.state.manager
    name = names.resolve(manager.registry, body.model or body.name)
    cfg: ModelConfig = manager.config(name)
    # FIM tokens and the served context are known once the model is loaded (models.toml may
    # override GGUF metadata), so show loads it, as the client's next request would anyway.
    worker = await relay.model_worker(request, name)
    path = manager.store.local_path(cfg)
    if path is None:
        raise ModelUnavailable(f"model '{name}' has no local file")
    info = await _info(path, cfg)
    engine = worker.engine
    n_ctx = engine.info.n_ctx
    template = go_template(engine)
    arch = info.architecture
    model_info = {
        "general.architecture": arch,
        "general.parameter_count": info.parameter_count,
        "general.file_type": info.file_type,
        **dict(info.extra),
        # The context served (n_ctx in models.toml), which is what a prompt must fit.
        f"{arch}.context_length": n_ctx,
    }
    capabilities = ["completion"] + (["insert"] if engine.info.fim is not None else [])
    response = ShowResponse(
        modelfile=(
            f"# Modelfile of {names.tagged(name)}, as served by codeserve\n"
            f'FROM {path}\nTEMPLATE """{template}"""\nPARAMETER num_ctx {n_ctx}\n'
        ),
        parameters=f"num_ctx {n_ctx}",
        template=template,
        details=modelinfo.details(info),
        model_info=model_info,
        capabilities=capabilities,
        modified_at=timestamp(path.stat().st_mtime),
    )
    return JSONResponse(response.model_dump())


def _vram(cfg: ModelConfig, size: int) -> int:
    import llama_cpp

    on_gpu = cfg.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
    return size if on_gpu else 0


@router.get("/api/ps")
async def ps(request: Request) -> JSONResponse:
    manager = request.app.state.manager
    running = []
    now = time.time()
    for r in sorted(manager.resident(), key=lambda r: -r.expires_at):
        cfg = manager.registry.get(r.name)
        path = None if cfg is None else manager.store.local_path(cfg)
        if cfg is None or path is None:
            continue
        info = await _info(path, cfg)
        expires = now + _FOREVER_S if math.isinf(r.expires_at) else r.expires_at
        running.append(
            RunningModel(
                name=names.tagged(r.name),
                model=names.tagged(r.name),
                size=r.memory_bytes,
                digest=info.digest,
                details=modelinfo.details(info),
                expires_at=timestamp(expires),
                size_vram=_vram(cfg, r.memory_bytes),
                context_length=r.n_ctx,
            ).model_dump()
        )
    return JSONResponse({"models": running})
