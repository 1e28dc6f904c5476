"""llama-server's native routes: /completion, /infill, /tokenize, /detokenize, /props, /slots.

For llama.vscode and llama.vim (``/infill``), Continue's ``llama.cpp`` provider and Tabby
(``/completion``). ``model`` picks a codeserve model where llama-server would ignore it; without
it the default model answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import __version__
from server.api import relay
from server.api.llamacpp.generate import generate
from server.api.llamacpp.protocol import (
    CompletionRequest,
    DetokenizeRequest,
    GenerationFields,
    InfillRequest,
    TokenizeRequest,
)
from server.api.sse import EventStream
from server.core.fim_request import fim_prompt
from server.engine.fim import ExtraFile
from server.errors import InvalidRequest, QueueTimeout
from server.scheduler import ModelWorker

router = APIRouter()

Answer = JSONResponse | EventStream | None
# Request defaults /props reports (llama-server's own, see protocol).
_DEFAULTS_SHOWN = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_last_n",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "n_probs",
    "min_keep",
)


def _check_ids(worker: ModelWorker, ids: list[int], param: str) -> None:
    n_vocab = worker.engine.info.n_vocab
    if any(t < 0 or t >= n_vocab for t in ids):
        raise InvalidRequest(f"{param} token ids must be in [0, {n_vocab})", param=param)


# Both answers as llama-server gives them: one JSON object (an array with several candidates), or
# with `stream: true` server-sent `data: {...}` events.
_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events of chunks",
        "content": {
            "application/json": {"schema": {"type": ["object", "array"]}},
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string", "description": "a JSON chunk"}},
                }
            },
        },
    }
}


@router.post("/completion", response_model=None, responses=_ANSWERS)
@router.post("/completions", response_model=None, include_in_schema=False)
async def completion(body: CompletionRequest, request: Request) -> Answer:
    worker = await relay.model_worker(request, body.model)
    if isinstance(body.prompt, str):
        prompt = await relay.tokenizing(
            len(body.prompt), worker.engine.tokenize, body.prompt, add_bos=True, special=True
        )
    else:
        _check_ids(worker, body.prompt, "prompt")
        prompt = list(body.prompt)
    if not prompt:
        raise InvalidRequest("prompt is empty", param="prompt")
    return await generate(worker, body, prompt, request, "llamacpp-completion")


@router.post("/infill", response_model=None, responses=_ANSWERS)
async def infill(body: InfillRequest, request: Request) -> Answer:
    worker = await relay.model_worker(request, body.model)
    # llama-server appends `prompt` to the prefix, so it survives any trimming of the prefix.
    extra = [ExtraFile(c.filename, c.text) for c in body.input_extra]
    prefix = body.input_prefix + body.prompt
    prompt = await relay.tokenizing(
        len(prefix) + len(body.input_suffix) + sum(len(e.text) for e in extra),
        fim_prompt,
        worker.engine,
        prefix,
        body.input_suffix,
        max_tokens=body.requested_tokens(),
        extra=extra,
        suffix_param="input_suffix",
    )
    return await generate(worker, body, prompt, request, "llamacpp-infill")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    engine = (await relay.model_worker(request, body.model, kind=None)).engine
    ids = engine.tokenize(body.content, add_bos=body.add_special, special=body.parse_special)
    if not body.with_pieces:
        return JSONResponse({"tokens": ids})
    # Pieces come from the engine's detokenizer: special tokens render as "" and a piece that is
    # not valid UTF-8 on its own as U+FFFD (llama-server gives the marker text and a byte list).
    return JSONResponse({"tokens": [{"id": t, "piece": engine.detokenize([t])} for t in ids]})


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    worker = await relay.model_worker(request, body.model, kind=None)
    _check_ids(worker, body.tokens, "tokens")
    return JSONResponse({"content": worker.engine.detokenize(body.tokens)})


def _slots(worker: ModelWorker) -> list[dict[str, Any]]:
    # Which slot runs what is the engine's business: the first `running` slots read as busy.
    total = worker.capacity
    n_ctx = worker.engine.info.n_ctx
    return [
        {
            "id": i,
            "id_task": -1,
            "n_ctx": n_ctx,
            "speculative": False,
            "is_processing": i < worker.running,
        }
        for i in range(total)
    ]


@router.get("/slots")
async def slots(
    request: Request, model: str | None = None, fail_on_no_slot: bool = False
) -> JSONResponse:
    worker = await relay.model_worker(request, model, kind=None)
    out = _slots(worker)
    if fail_on_no_slot and all(s["is_processing"] for s in out):
        raise QueueTimeout("no slot available", code="no_slot_available")
    return JSONResponse(out)


@router.get("/props")
async def props(request: Request, model: str | None = None) -> JSONResponse:
    worker = await relay.model_worker(request, model, kind=None)
    info = worker.engine.info
    defaults = {k: GenerationFields.model_fields[k].default for k in _DEFAULTS_SHOWN}
    return JSONResponse(
        {
            "default_generation_settings": {
                "id": 0,
                "id_task": -1,
                "n_ctx": info.n_ctx,
                "speculative": False,
                "is_processing": worker.running > 0,
                "params": {**defaults, "n_predict": -1, "seed": 0xFFFFFFFF},
            },
            "total_slots": len(_slots(worker)),
            "model_alias": worker.name,
            "model_path": worker.name,
            "modalities": {"vision": False, "audio": False},
            "chat_template": info.chat_template or "",
            "bos_token": info.bos_token,
            "eos_token": info.eos_token,
            "infill": info.fim is not None,
            "build_info": f"codeserve {__version__}",
        }
    )
