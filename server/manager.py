"""Resident models: loaded on first use (or at start-up), unloaded least-recently-used.

The manager owns one ``ModelWorker`` per loaded model. Before a load it frees memory by closing
idle workers, oldest use first, until the new model's estimated footprint fits the budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from server.engine.base import KV_BYTES_PER_ELEMENT, Engine
from server.errors import ModelNotFound, ModelUnavailable
from server.metrics import Metrics
from server.registry import ModelConfig, Registry
from server.scheduler import ModelWorker
from server.settings import ServerSettings
from server.store import ModelStore

log = logging.getLogger(__name__)

# Called as factory(path, cfg), plus draft=(path, cfg) when the model names a draft model.
EngineFactory = Callable[..., Engine]


def estimate_footprint(file_bytes: int, cfg: ModelConfig) -> int:
    """Weights plus a KV-cache allowance, before the model's shape is known.

    Small models spend roughly as many bytes on a full f16 KV cache at 4k context as on 10-20% of
    their Q4 weights; the allowance scales with n_ctx and the cache type. Once loaded, the engine
    reports the real figure and that replaces this guess.
    """
    kv = file_bytes * 0.15 * (cfg.n_ctx / 4096) * KV_BYTES_PER_ELEMENT[cfg.kv_cache] / 2
    return int(file_bytes + kv)


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        settings: ServerSettings,
        engine_factory: EngineFactory,
        metrics: Metrics | None = None,
    ):
        self.registry = registry
        self.settings = settings
        self.store = ModelStore(registry, settings.cache_dir)
        self.default_model = settings.model or registry.default_model
        self._engine_factory = engine_factory
        self.metrics = metrics
        self._workers: OrderedDict[str, ModelWorker] = OrderedDict()
        self._footprints: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.load_errors: dict[str, str] = {}

    def config(self, name: str | None) -> ModelConfig:
        name = name or self.default_model
        cfg = self.registry.get(name)
        if cfg is None:
            raise ModelNotFound(
                f"The model {name!r} does not exist. Available: {', '.join(self.registry.models)}",
                param="model",
            )
        return cfg

    def loaded(self) -> list[str]:
        return list(self._workers)

    def is_loaded(self, name: str) -> bool:
        return name in self._workers

    async def get(self, name: str | None) -> ModelWorker:
        cfg = self.config(name)
        worker = self._workers.get(cfg.name)
        if worker is None:
            lock = self._locks.setdefault(cfg.name, asyncio.Lock())
            async with lock:
                worker = self._workers.get(cfg.name) or await self._load(cfg)
        self._workers.move_to_end(cfg.name)
        return worker

    async def _load(self, cfg: ModelConfig) -> ModelWorker:
        try:
            path = await asyncio.to_thread(self.store.pull, cfg)
            need = estimate_footprint(path.stat().st_size, cfg)
            extra: dict[str, tuple[Path, ModelConfig]] = {}
            if cfg.draft is not None:
                # The draft is part of this model: fetched, budgeted and loaded with it, and its
                # cache spans the target's context.
                draft_cfg = self.config(cfg.draft)
                draft_path = await asyncio.to_thread(self.store.pull, draft_cfg)
                sized = draft_cfg.model_copy(update={"n_ctx": cfg.n_ctx})
                need += estimate_footprint(draft_path.stat().st_size, sized)
                extra["draft"] = (draft_path, draft_cfg)
            await self._make_room(cfg.name, need)
            t0 = time.perf_counter()
            engine = await asyncio.to_thread(self._engine_factory, path, cfg, **extra)
            load_s = time.perf_counter() - t0
        except Exception as e:
            self.load_errors[cfg.name] = str(e)
            raise
        self.load_errors.pop(cfg.name, None)
        worker = ModelWorker(
            cfg.name,
            engine,
            queue_size=self.settings.queue_size,
            queue_timeout_s=self.settings.queue_timeout_s,
            metrics=self.metrics,
        )
        if self.metrics is not None:
            self.metrics.load_seconds.labels(cfg.name).set(load_s)
        self._workers[cfg.name] = worker
        self._footprints[cfg.name] = engine.info.memory_bytes or need
        log.info(
            "model %s resident: %d MiB (weights + KV cache at n_ctx=%d)",
            cfg.name,
            self._footprints[cfg.name] >> 20,
            engine.info.n_ctx,
        )
        return worker

    async def _make_room(self, name: str, need: int) -> None:
        budget = self.settings.memory_budget_mb << 20
        if need > budget:
            raise ModelUnavailable(
                f"model {name!r} needs about {need >> 20} MiB, more than the whole memory budget "
                f"({budget >> 20} MiB); raise CODESERVE_MEMORY_BUDGET_MB"
            )
        for victim in list(self._workers):  # oldest use first
            if sum(self._footprints.values()) + need <= budget:
                return
            if not self._workers[victim].busy:
                await self.unload(victim)
        used = sum(self._footprints.values())
        if used + need > budget:
            raise ModelUnavailable(
                f"model {name!r} needs about {need >> 20} MiB but only {(budget - used) >> 20} MiB "
                f"of the {budget >> 20} MiB budget is free and the resident models are busy; "
                "retry later"
            )

    def state(self) -> list[dict]:
        """Live figures per resident model, read at scrape time (see server.metrics)."""
        rows = []
        for name, w in list(self._workers.items()):
            used = w.engine.kv_tokens()
            # Every slot has n_ctx cells of its own: the ratio is of the whole cache.
            cells = w.engine.info.n_ctx * w.engine.slots
            rows.append(
                {
                    "model": name,
                    "processing": w.running,
                    "deferred": w.queue_depth,
                    "kv_tokens": used,
                    "kv_ratio": used / cells,
                    "memory_bytes": self._footprints.get(name, 0),
                }
            )
        return rows

    async def unload(self, name: str) -> None:
        worker = self._workers.pop(name)
        self._footprints.pop(name, None)
        log.info("unloading model %s", name)
        await asyncio.to_thread(worker.close)

    async def close(self) -> None:
        for name in list(self._workers):
            await self.unload(name)
