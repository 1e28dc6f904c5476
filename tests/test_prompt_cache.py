"""The host-RAM prompt cache: bookkeeping (pure) and restores on the real model."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.base import Finished, GenerationRequest, SamplingParams
from server.engine.batched import BatchedEngine
from server.engine.model import Model
from server.engine.prompt_cache import MIN_REUSE, PromptCache
from server.engine.slot_cache import IDLE_CELLS
from server.scheduler import ModelWorker
from tests.conftest import greedy_run


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_lru_within_the_byte_bound():
    cache = PromptCache(max_bytes=250)
    for i in range(5):
        cache.put(toks(1000 * i, MIN_REUSE), b"x" * 100)
        assert cache.bytes_held <= 250
    assert len(cache) == 2  # the two most recent
    assert cache.take(toks(0, MIN_REUSE + 5), better_than=0) is None  # evicted
    assert cache.take(toks(4000, MIN_REUSE + 5), better_than=0) is not None


def test_a_longer_state_replaces_the_prefixes_it_extends():
    cache = PromptCache(max_bytes=10_000)
    cache.put(toks(0, MIN_REUSE), b"a" * 10)
    cache.put(toks(0, MIN_REUSE + 40), b"b" * 20)
    assert len(cache) == 1 and cache.bytes_held == 20


def test_take_only_beats_what_a_slot_already_offers():
    cache = PromptCache(max_bytes=10_000)
    cache.put(toks(0, 200), b"s")
    prompt = [*toks(0, 150), 99_999]
    assert cache.take(prompt, better_than=150) is None  # a slot already has all 150
    hit = cache.take(prompt, better_than=10)
    assert hit is not None and cache.hits == 1
    assert cache.take(toks(5000, 100), better_than=0) is None and cache.misses == 1
    assert cache.take(toks(5000, 5), better_than=0) is None and cache.misses == 1  # too short
    assert PromptCache(0).worth_saving(toks(0, 500)) is False


@pytest.mark.model
def test_a_restored_prompt_gives_the_cold_text_and_the_bound_holds(model_path, registry):
    cfg = registry.models["smollm2-135m"].model_copy(update={"n_ctx": 512})
    engine = BatchedEngine(Model.load(model_path, cfg), slots=4, prompt_cache_mb=8)
    worker = ModelWorker("m", engine, queue_size=8, queue_timeout_s=60)
    greedy = SamplingParams(temperature=0)
    files = [
        "".join(f"def {name}_{i}(x):\n    return x * {i} + {len(name)}\n" for i in range(12))
        for name in ("alpha", "beta", "gamma", "delta", "omega")
    ]

    async def complete(text: str) -> tuple[str, Finished]:
        prompt = engine.tokenize(text, add_bos=True)
        assert len(prompt) > MIN_REUSE
        out, finished = "", None
        async for ev in worker.stream(GenerationRequest(prompt, 24, sampling=greedy)):
            if isinstance(ev, Finished):
                finished = ev
            else:
                out += ev.text
        assert finished is not None
        return out, finished

    async def visit() -> tuple[list[tuple[str, Finished]], list[tuple[str, Finished]]]:
        cold = [await complete(f) for f in files]
        # Going back, most recent first: those dropped from the KV cache come from host RAM.
        back = [await complete(f) for f in reversed(files[:-1])]
        return cold, back[::-1]

    try:
        cold, back = asyncio.run(visit())
        stats = engine.cache_stats()
        assert stats.hits >= 1, stats
        assert 0 < stats.bytes_held <= 8 << 20
        restored = [b for b in back if b[1].timings.cached_tokens > MIN_REUSE]
        assert restored, [b[1].timings for b in back]
        for (text_cold, _), (text_back, f) in zip(cold, back, strict=False):
            if f.timings.cached_tokens > MIN_REUSE:
                assert text_back == text_cold
    finally:
        worker.close()


def test_short_prompts_sent_round_robin_come_back_whole(model_path, registry):
    """Eight short prompts in turn (an editor completing in several places): each finds its
    cache again, restored from host RAM (idle caches leave the buffer when the next request
    starts: idle cells slow every step), and with the logits after it nothing is evaluated."""
    cfg = registry.models["smollm2-135m"].model_copy(update={"n_ctx": 512})
    engine = BatchedEngine(Model.load(model_path, cfg), slots=8, prompt_cache_mb=8)
    worker = ModelWorker("m", engine, queue_size=8, queue_timeout_s=60)
    prompts = [engine.tokenize(f"def task_{i}(items):\n    ", add_bos=True) for i in range(8)]
    assert all(len(p) < 64 for p in prompts)

    async def cached(prompt: list[int]) -> int:
        req = GenerationRequest(prompt, 4, sampling=SamplingParams(temperature=0))
        async for ev in worker.stream(req):
            if isinstance(ev, Finished):
                return ev.timings.cached_tokens
        raise AssertionError("no Finished event")

    async def laps() -> list[int]:
        for p in prompts:
            await cached(p)
        return [await cached(p) for p in prompts]

    try:
        second = asyncio.run(laps())
        # Whole, with the logits after each (server.engine.prompt_logits): nothing evaluated.
        assert second == [len(p) for p in prompts]
        assert engine.prompt_cache.hits == len(prompts)  # each restored once, in the second lap
    finally:
        worker.close()


def test_a_long_idle_cache_leaves_the_buffer_and_comes_back_from_host_ram(model_path, registry):
    """Idle cells slow every step, so an idle cache is saved and freed when the next request
    starts; going back to its prompt restores it whole."""
    cfg = registry.models["smollm2-135m"].model_copy(update={"n_ctx": 1024})
    engine = BatchedEngine(Model.load(model_path, cfg), slots=4, prompt_cache_mb=64)
    worker = ModelWorker("m", engine, queue_size=4, queue_timeout_s=60)
    source = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(40))
    long = engine.tokenize(source, add_bos=True)
    short = engine.tokenize("def main():\n    ", add_bos=True)
    assert IDLE_CELLS < len(long) < cfg.n_ctx - 8

    async def run(prompt: list[int]) -> tuple[int, str]:
        return await greedy_run(worker, prompt, 4)

    async def visits() -> None:
        await run(long)
        await run(short)  # the long prompt's cache is idle now: out of the buffer
        assert engine.kv_tokens() <= len(short) + 4
        assert engine.prompt_cache.bytes_held > 0
        cached, _ = await run(long)
        assert cached == len(long)  # restored whole; the logits after it were kept
        assert engine.prompt_cache.hits == 1

    try:
        asyncio.run(visits())
    finally:
        worker.close()


def test_a_cut_saves_the_state_only_when_most_of_it_or_a_long_tail_goes():
    cache = PromptCache(max_bytes=10_000)
    assert cache.worth_saving_before_cut(toks(0, 100), keep=2)  # (nearly) all of it goes
    assert not cache.worth_saving_before_cut(toks(0, 100), keep=70)  # a completion's tail
    assert cache.worth_saving_before_cut(toks(0, 200), keep=100)
