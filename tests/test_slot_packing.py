"""Packing idle caches back to the start of the shared KV buffer once a burst has left holes."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from server.engine.batch_state import Slot
from server.engine.batched import PACK_AFTER_S, BatchedEngine
from server.engine.model import Model
from server.engine.prompt_cache import PromptCache
from server.engine.slot_cache import PACK_SLACK, SlotCaches
from server.scheduler import ModelWorker
from tests.conftest import greedy_run


class RecordingContext:
    """Sequences as token lists; records what packing does to them."""

    def __init__(self, fail: frozenset[int] = frozenset()) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def save_seq(self, seq: int) -> bytes:
        self.calls.append(("save", seq))
        return bytes([seq])

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        self.calls.append(("rm", seq))

    def restore_seq(self, seq: int, state: bytes) -> bool:
        assert state == bytes([seq])
        self.calls.append(("restore", seq))
        return seq not in self.fail


def caches(ctx: RecordingContext, held: list[int]) -> tuple[SlotCaches, list[Slot]]:
    slots = [Slot(i, list(range(n)), released=float(i)) for i, n in enumerate(held)]
    model = SimpleNamespace(cfg=SimpleNamespace(cache_reuse=0), info=SimpleNamespace(bos_id=1))
    return SlotCaches(ctx, model, slots, PromptCache(0), 512), slots  # type: ignore[arg-type]


def test_a_buffer_is_spread_once_cells_were_freed_below_what_stays():
    c, slots = caches(RecordingContext(), [300, 300, 300, 300])
    c.note_use()  # a burst: 1,200 cells at once
    assert not c.spread()  # nothing freed since
    for s in slots[1:]:
        s.tokens = []  # three caches went to host RAM
    assert c.spread()  # 900 cells may be free below the 300 kept
    slots[1].tokens = list(range(700))
    assert not c.spread()  # packing 1,000 cells would free fewer than it copies
    c2, slots2 = caches(RecordingContext(), [100, PACK_SLACK - 1])
    c2.note_use()
    slots2[1].tokens = []
    assert not c2.spread()  # under llama.cpp's padding of the span: nothing to gain


def test_packing_saves_every_cache_frees_them_all_then_restores_the_recent_first():
    ctx = RecordingContext()
    c, slots = caches(ctx, [40, 0, 60, 50])
    c.pack()
    assert ctx.calls == [
        ("save", 3),
        ("save", 2),
        ("save", 0),
        ("rm", 3),
        ("rm", 2),
        ("rm", 0),
        ("restore", 3),
        ("restore", 2),
        ("restore", 0),
    ]
    assert [len(s.tokens) for s in slots] == [40, 0, 60, 50]
    assert not c.spread()


def test_a_cache_that_does_not_come_back_is_dropped_not_kept_as_a_ghost():
    ctx = RecordingContext(fail=frozenset({2}))
    c, slots = caches(ctx, [40, 0, 60])
    c.pack()
    after = ctx.calls[ctx.calls.index(("restore", 2)) + 1]
    assert slots[2].tokens == [] and after == ("rm", 2)
    assert len(slots[0].tokens) == 40


def test_after_a_burst_the_idle_engine_packs_and_its_caches_still_answer(model_path, registry):
    cfg = registry.models["smollm2-135m"].model_copy(update={"n_ctx": 1024})
    engine = BatchedEngine(Model.load(model_path, cfg), slots=4, prompt_cache_mb=64)
    worker = ModelWorker("m", engine, queue_size=8, queue_timeout_s=60)
    packs = []
    pack = engine._caches.pack

    def counted() -> None:
        packs.append(engine.kv_tokens())
        pack()

    engine._caches.pack = counted  # type: ignore[method-assign]
    burst = [
        engine.tokenize(
            "".join(f"def f{k}_{i}(x):\n    return x * {i} + {k}\n\n" for i in range(20)),
            add_bos=True,
        )
        for k in range(4)
    ]
    short = engine.tokenize("def main():\n    ", add_bos=True)
    assert all(len(p) > 2 * 512 // 4 for p in burst)

    async def run(prompt: list[int]) -> tuple[int, str]:
        return await greedy_run(worker, prompt, 8)

    async def visits() -> None:
        await asyncio.gather(*(run(p) for p in burst))
        alone = await run(short)  # most of the burst's caches leave for host RAM meanwhile
        await asyncio.sleep(PACK_AFTER_S + 0.5)
        assert len(packs) == 1 and packs[0] == engine.kv_tokens()
        again = await run(short)
        # Its packed cells (and the logits kept after it: nothing evaluated), the same text.
        assert again == (len(short), alone[1])
        for p in burst:  # each whole from its packed cells or from host RAM
            assert (await run(p))[0] == len(p)

    try:
        asyncio.run(visits())
        time.sleep(PACK_AFTER_S + 0.5)
    finally:
        worker.close()
