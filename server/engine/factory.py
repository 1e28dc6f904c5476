"""Which engine serves a model: the server-wide `engine` setting, decided per model for "auto"."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from server.engine.base import Engine
from server.registry import ModelConfig

log = logging.getLogger(__name__)

EngineChoice = Literal["auto", "simple", "batched"]


def uses_batched(choice: EngineChoice, cfg: ModelConfig) -> bool:
    # The batched engine speculates with prompt lookup per sequence; a draft model runs only in
    # the simple engine (one sequence at a time), so a model that names one keeps that engine.
    if choice == "auto":
        return cfg.speculative_mode != "draft"
    return choice == "batched"


def make_engine_factory(
    choice: EngineChoice, slots: int, prefill_chunk: int, prompt_cache_mb: int = 0
) -> Any:
    def make(path: Path, cfg: ModelConfig, **kwargs: Any) -> Engine:
        if cfg.kind == "embedding":  # whatever `engine` says: the others only generate
            from server.engine.embedding import EmbeddingEngine

            return EmbeddingEngine(path, cfg, slots=slots)
        if uses_batched(choice, cfg):
            import llama_cpp

            from server.engine.batched import BatchedEngine
            from server.engine.devices import list_devices, report_load
            from server.engine.model import Model

            before = list_devices()
            model = Model.load(path, cfg)
            try:
                engine = BatchedEngine(
                    model, slots=slots, prefill_chunk=prefill_chunk, prompt_cache_mb=prompt_cache_mb
                )
            except BaseException:
                model.close()
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
