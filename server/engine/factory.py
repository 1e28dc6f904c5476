"""Which engine serves a model: the server-wide `engine` setting ("auto": the batched engine)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from server.engine.base import Engine
from server.registry import ModelConfig

log = logging.getLogger(__name__)

EngineChoice = Literal["auto", "simple", "batched"]


def make_engine_factory(
    choice: EngineChoice,
    slots: int,
    prefill_chunk: int,
    prompt_cache_mb: int = 0,
    stream_frame_ms: float = 0.0,
) -> Any:
    def make(path: Path, cfg: ModelConfig, **kwargs: Any) -> Engine:
        if cfg.kind == "embedding":  # whatever `engine` says: the others only generate
            from server.engine.embedding import EmbeddingEngine

            return EmbeddingEngine(path, cfg, slots=slots)
        # "auto" is the batched engine: it speculates per sequence, with prompt lookup or the
        # model's draft model, so no model needs the simple one.
        if choice != "simple":
            import llama_cpp

            from server.engine.batched import BatchedEngine
            from server.engine.devices import list_devices, report_load
            from server.engine.model import Model

            before = list_devices()
            model = Model.load(path, cfg)
            draft: Model | None = None
            try:
                if kwargs.get("draft") is not None:
                    draft_path, draft_cfg = kwargs["draft"]
                    sized = draft_cfg.model_copy(update={"n_ctx": cfg.n_ctx})  # as many cells as it
                    draft = Model.load(draft_path, sized)
                engine = BatchedEngine(
                    model,
                    slots=slots,
                    prefill_chunk=prefill_chunk,
                    prompt_cache_mb=prompt_cache_mb,
                    draft=draft,
                    frame_ms=stream_frame_ms,
                )
            except BaseException:
                model.close()
                if draft is not None:
                    draft.close()
                raise
            report_load(
                cfg.name,
                before,
                cfg.n_gpu_layers,
                model.n_layer,
                llama_cpp.llama_supports_gpu_offload(),
            )
            return engine
        from server.engine.llama import LlamaEngine

        return LlamaEngine(path, cfg, **kwargs)

    return make
