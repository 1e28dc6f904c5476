"""Resident models: loaded on first use, unloaded least-recently-used (fake engine)."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import ModelNotFound, ModelUnavailable
from server.manager import ModelManager
from server.registry import parse_registry
from server.settings import ServerSettings
from tests.fakes import FakeEngine


def manager(tmp_path, budget_mb: int) -> tuple[ModelManager, dict]:
    models = {}
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.gguf").write_bytes(b"\0" * (3 << 20))  # 3 MiB each
        models[name] = {"source": {"path": f"{name}.gguf"}, "n_ctx": 256}
    reg = parse_registry({"default_model": "a", "models": models}, tmp_path / "models.toml")
    engines: dict[str, FakeEngine] = {}

    def factory(path, cfg):
        engines[cfg.name] = FakeEngine(size_bytes=path.stat().st_size)
        return engines[cfg.name]

    settings = ServerSettings(memory_budget_mb=budget_mb, cache_dir=tmp_path / "cache")
    return ModelManager(reg, settings, factory), engines


def test_lru_unload_under_budget(tmp_path):
    async def main():
        m, engines = manager(tmp_path, budget_mb=7)  # room for two 3 MiB models
        await m.get("a")
        await m.get("b")
        await m.get("a")  # a is now the most recently used
        await m.get("c")  # evicts b
        loaded = m.loaded()
        await m.close()
        return loaded, engines

    loaded, engines = asyncio.run(main())
    assert sorted(loaded) == ["a", "c"]
    assert engines["b"].closed.is_set()


def test_default_model_and_unknown_names(tmp_path):
    async def main():
        m, _ = manager(tmp_path, budget_mb=100)
        w = await m.get(None)
        with pytest.raises(ModelNotFound, match="does not exist"):
            await m.get("zzz")
        await m.close()
        return w.name

    assert asyncio.run(main()) == "a"


def test_model_bigger_than_budget(tmp_path):
    async def main():
        m, _ = manager(tmp_path, budget_mb=2)
        with pytest.raises(ModelUnavailable, match="memory budget"):
            await m.get("a")
        assert "a" in m.load_errors
        await m.close()

    asyncio.run(main())
