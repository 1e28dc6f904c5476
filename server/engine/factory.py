"""Which engine serves a model: the server-wide `engine` setting, decided per model for "auto"."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from server.engine.base import Engine
from server.registry import ModelConfig

EngineChoice = Literal["auto", "simple", "batched"]


def uses_batched(choice: EngineChoice, cfg: ModelConfig) -> bool:
    # Speculative decoding runs in the simple engine (one stream, draft + verify per step), so a
    # model configured to speculate keeps it under "auto"; everything else gets batching.
    if choice == "auto":
        return cfg.draft is None
    return choice == "batched"


def make_engine_factory(choice: EngineChoice, slots: int, prefill_chunk: int):
    def make(path: Path, cfg: ModelConfig, **kwargs) -> Engine:
        if uses_batched(choice, cfg):
            from server.engine.batched import BatchedEngine

            return BatchedEngine(path, cfg, slots=slots, prefill_chunk=prefill_chunk)
        from server.engine.llama import LlamaEngine

        return LlamaEngine(path, cfg, **kwargs)

    return make
