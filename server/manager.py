"""Resident models: loaded on first use (or at start-up), unloaded when idle or for memory.

The manager owns one ``ModelWorker`` per loaded model. Before a load it frees memory by closing
idle workers, oldest use first, until the new model's estimated footprint fits the budget.

Lifecycle (one mechanism for every dialect): a request holds a *lease* on its model from the
moment it is resolved until its response is over (``get(hold=True)`` ... ``release``), so a model
is never unloaded between tokenizing a prompt and the first step. When the last lease goes, the
model's ``keep_alive`` starts counting: the request's own value when it sent one (Ollama's
``keep_alive``, codeserve's extension on /v1), else models.toml's, else never for the default and
preloaded models and five minutes for the others. 0 unloads at once, a negative value never.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.engine.base import KV_BYTES_PER_ELEMENT, Engine
from server.errors import ModelNotFound, ModelUnavailable
from server.keepalive import NEVER
from server.metrics import Metrics
from server.registry import ModelConfig, Registry
from server.scheduler import ModelWorker
from server.settings import ServerSettings
from server.store import ModelStore

log = logging.getLogger(__name__)

# Called as factory(path, cfg), plus draft=(path, cfg) when the model names a draft model.
EngineFactory = Callable[..., Engine]

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default, for models that are neither default nor preloaded
# A model found busy without a lease (a caller that bypassed the relay) is re-checked this often.
_BUSY_RECHECK_S = 1.0


@dataclass(frozen=True)
class Resident:
    """A loaded model as /api/ps and /v1/resident_models report it."""

    name: str
    memory_bytes: int
    n_ctx: int
    busy: bool
    keep_alive_s: float  # NEVER: stays until unloaded explicitly or for memory
    expires_at: float  # wall-clock seconds; NEVER when it has no deadline
    loaded_at: float


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
        self._leases: dict[str, int] = {}
        self._keep: dict[str, float] = {}  # keep_alive in force: the last request's, or config
        self._expires: dict[str, float] = {}
        self._loaded_at: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._unload_requested: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

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

    def configured_keep_alive(self, cfg: ModelConfig) -> float:
        if cfg.keep_alive is not None:
            return cfg.keep_alive
        if cfg.name == self.default_model or cfg.preload:
            return NEVER
        return DEFAULT_KEEP_ALIVE_S

    async def get(
        self, name: str | None, *, hold: bool = False, keep_alive: float | None = None
    ) -> ModelWorker:
        """The model's worker, loading it first if needed.

        With ``hold``, the caller takes a lease that keeps the model loaded until ``release``.
        Without, the model's keep_alive (or ``keep_alive``) starts counting now: a load for its
        own sake.
        """
        cfg = self.config(name)
        worker = self._workers.get(cfg.name)
        if worker is None:
            lock = self._locks.setdefault(cfg.name, asyncio.Lock())
            async with lock:
                worker = self._workers.get(cfg.name) or await self._load(cfg)
        self._workers.move_to_end(cfg.name)
        if hold:
            self._leases[cfg.name] = self._leases.get(cfg.name, 0) + 1
            self._cancel_timer(cfg.name)
            self._expires[cfg.name] = NEVER
        elif self._leases.get(cfg.name, 0) == 0:
            if keep_alive is None:
                keep_alive = self.configured_keep_alive(cfg)
            self._keep[cfg.name] = keep_alive
            self._schedule(cfg.name)
        return worker

    def release(self, worker: ModelWorker, keep_alive: float | None = None) -> None:
        """End a lease taken with ``get(hold=True)``; ``keep_alive`` overrides the model's."""
        name = worker.name
        if self._workers.get(name) is not worker:
            return  # unloaded meanwhile (explicitly), perhaps loaded again: not this lease's
        self._leases[name] = max(0, self._leases.get(name, 0) - 1)
        if keep_alive is None:
            keep_alive = self.configured_keep_alive(self.config(name))
        self._keep[name] = keep_alive
        if self._leases[name] == 0:
            self._schedule(name)

    def _idle(self, name: str) -> bool:
        worker = self._workers.get(name)
        return worker is not None and not worker.busy and self._leases.get(name, 0) == 0

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _schedule(self, name: str) -> None:
        """Arm the idle timer of a model nobody holds (or unload it now)."""
        self._cancel_timer(name)
        keep = 0.0 if name in self._unload_requested else self._keep.get(name, NEVER)
        if keep == NEVER:
            self._expires[name] = NEVER
            return
        self._expires[name] = time.time() + keep
        if keep <= 0:
            self._spawn(self._expire(name))
        else:
            loop = asyncio.get_running_loop()
            self._timers[name] = loop.call_later(keep, lambda: self._spawn(self._expire(name)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, name: str) -> None:
        self._timers.pop(name, None)
        if name not in self._workers or self._leases.get(name, 0) > 0:
            return  # unloaded already, or a request took it again (its release re-arms)
        if self._workers[name].busy:  # used without a lease: look again shortly
            loop = asyncio.get_running_loop()
            delay = max(self._keep.get(name, 0.0), _BUSY_RECHECK_S)
            self._timers[name] = loop.call_later(delay, lambda: self._spawn(self._expire(name)))
            return
        reason = "request" if name in self._unload_requested else "idle"
        await self.unload(name, reason=reason)

    async def request_unload(self, name: str) -> bool:
        """Unload a model now if idle, else as soon as its requests end. False: not loaded."""
        if name not in self._workers:
            return False
        self._unload_requested.add(name)
        if self._idle(name):
            await self.unload(name, reason="request")
        else:
            self._expires[name] = time.time()
        return True

    def resident(self) -> list[Resident]:
        rows = []
        now = time.time()
        for name, w in list(self._workers.items()):
            held = self._leases.get(name, 0) > 0 or w.busy
            keep = 0.0 if name in self._unload_requested else self._keep.get(name, NEVER)
            expires = self._expires.get(name, NEVER)
            if held and keep != NEVER:
                expires = now + keep  # counts from the end of the requests in flight
            rows.append(
                Resident(
                    name=name,
                    memory_bytes=self._footprints.get(name, 0),
                    n_ctx=w.engine.info.n_ctx,
                    busy=held,
                    keep_alive_s=keep,
                    expires_at=expires,
                    loaded_at=self._loaded_at.get(name, now),
                )
            )
        return rows

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
            self.metrics.loads.labels(cfg.name).inc()
        self._workers[cfg.name] = worker
        self._loaded_at[cfg.name] = time.time()
        self._keep[cfg.name] = self.configured_keep_alive(cfg)
        self._expires[cfg.name] = NEVER
        self._unload_requested.discard(cfg.name)
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
            if self._idle(victim):
                await self.unload(victim, reason="memory")
        used = sum(self._footprints.values())
        if used + need > budget:
            raise ModelUnavailable(
                f"model {name!r} needs about {need >> 20} MiB but only {(budget - used) >> 20} MiB "
                f"of the {budget >> 20} MiB budget is free and the resident models are busy; "
                "retry later"
            )

    def state(self) -> list[dict[str, Any]]:
        """Live figures per resident model, read at scrape time (see server.metrics)."""
        rows = []
        for name, w in list(self._workers.items()):
            used, cells = w.engine.kv_tokens(), w.engine.kv_cells
            cache = w.engine.cache_stats()
            rows.append(
                {
                    "model": name,
                    "processing": w.running,
                    "deferred": w.queue_depth,
                    "kv_tokens": used,
                    "kv_ratio": used / cells,
                    "memory_bytes": self._footprints.get(name, 0),
                    "resident": 1,
                    "keep_alive_s": self._keep.get(name, NEVER),
                    "prompt_cache_bytes": cache.bytes_held,
                    "prompt_cache_hits": cache.hits,
                    "prompt_cache_misses": cache.misses,
                    "kv_packs": cache.kv_packs,
                    "cpu_threads": w.engine.cpu_threads(),
                }
            )
        return rows

    async def unload(self, name: str, *, reason: str = "request") -> None:
        """Close a model now. ``reason`` labels the unload in /metrics (idle, memory, request)."""
        worker = self._workers.pop(name)
        self._footprints.pop(name, None)
        self._cancel_timer(name)
        for table in (self._leases, self._keep, self._expires, self._loaded_at):
            table.pop(name, None)
        self._unload_requested.discard(name)
        log.info("unloading model %s (%s)", name, reason)
        if self.metrics is not None:
            self.metrics.unloads.labels(name, reason).inc()
        await asyncio.to_thread(worker.close)

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting on every model; running requests get ``timeout_s`` to finish."""
        await asyncio.gather(*(w.drain(timeout_s) for w in list(self._workers.values())))

    async def close(self) -> None:
        for name in list(self._workers):
            await self.unload(name, reason="shutdown")
