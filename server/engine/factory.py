"""Which engine serves a model: the server-wide `engine` setting, decided per model for "auto"."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from server.engine.base import Engine
from server.registry import ModelConfig

EngineChoice = Literal["auto", "simple", "batched"]


def uses_batched(choice: EngineChoice, cfg: ModelConfig) -> bool:
    # Speculation is single-stream (verification needs the whole batch for one sequence), so a
    # model configured to speculate keeps the simple engine; every other model is batched: it
    # matches the simple engine on one stream and multiplies throughput with more (bench/).
    if choice == "auto":
        return cfg.speculative_mode == "off"
    return choice == "batched"


def make_engine_factory(choice: EngineChoice, slots: int, prefill_chunk: int):
    def make(path: Path, cfg: ModelConfig, **kwargs) -> Engine:
        if cfg.kind == "embedding":  # whatever `engine` says: the others only generate
            from server.engine.embedding import EmbeddingEngine

            return EmbeddingEngine(path, cfg, slots=slots)
        if uses_batched(choice, cfg):
            from server.engine.batched import BatchedEngine

            return BatchedEngine(path, cfg, slots=slots, prefill_chunk=prefill_chunk)
        from server.engine.llama import LlamaEngine

        return LlamaEngine(path, cfg, **kwargs)

    return make
