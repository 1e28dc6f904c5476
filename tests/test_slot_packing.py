"""Packing the shared KV buffer: idle caches back to its start once a burst has left holes, and
every slot into a run of its own once sequences decoding together have interleaved their cells."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from server.engine.batch_state import Slot
from server.engine.batched import PACK_AFTER_S, BatchedEngine
from server.engine.model import Model
from server.engine.prompt_cache import PromptCache
from server.engine.slot_cache import PACK_INTERLEAVED, PACK_SLACK, SlotCaches
from server.scheduler import ModelWorker
from tests.conftest import greedy_run
from tests.test_batched import PROMPTS, first_divergence_gap
from tests.test_lifecycle import metric


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


def test_busy_slots_are_packed_first_each_into_one_run():
    ctx = RecordingContext()
    c, slots = caches(ctx, [40, 60, 50, 30])
    slots[1].busy = slots[3].busy = True
    c.pack()
    restored = [seq for op, seq in ctx.calls if op == "restore"]
    assert restored == [3, 1, 2, 0]  # busy (recent first), then idle most recently used first
    assert [len(s.tokens) for s in slots] == [40, 60, 50, 30] and c.packs == 1


def test_a_busy_sequence_that_does_not_come_back_fails_rather_than_decode_without_cells():
    c, slots = caches(RecordingContext(fail=frozenset({1})), [40, 60])
    slots[1].busy = True
    with pytest.raises(RuntimeError, match="sequence 1"):
        c.pack()


def test_packing_between_steps_waits_for_enough_interleaved_cells():
    c, _ = caches(RecordingContext(), [100] * 8)
    for _ in range(40):
        c.note_step(1, 1)  # a lone sequence lays its cells in a run
    assert not c.interleaved()
    steps = PACK_INTERLEAVED // 8
    for _ in range(steps - 1):
        c.note_step(8, 8)
    assert not c.interleaved()
    c.note_step(8, 8)
    assert c.interleaved()
    c.pack()
    assert not c.interleaved()
    # Copies cost in proportion to what the slots hold: with more held, packs come later.
    big, _ = caches(RecordingContext(), [2000] * 8)
    for _ in range(steps):
        big.note_step(8, 8)
    assert not big.interleaved()


@pytest.mark.model
def test_streams_packed_while_they_decode_keep_their_text(server):
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    body = {"model": "smollm2-135m", "max_tokens": 48, "temperature": 0, "logprobs": 2}
    prompts = PROMPTS[:6]
    alone = [oc.completions.create(prompt=p, **body).choices[0].model_dump() for p in prompts]
    packs = metric(server.url, "codeserve_kv_packs_total", model="smollm2-135m")

    def together(p: str) -> list[str]:
        out = oc.completions.create(prompt=p, stream=True, **body)
        return [t for chunk in out for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]

    with ThreadPoolExecutor(len(prompts)) as pool:
        streamed = list(pool.map(together, prompts))
    # Six sequences decoding side by side interleave 6 cells a step: packed at least once.
    assert metric(server.url, "codeserve_kv_packs_total", model="smollm2-135m") > packs
    gaps = [first_divergence_gap(a, t) for a, t in zip(alone, streamed, strict=True)]
    # Packing moves cells, not their contents; what batching does to logits stays (test_batched).
    assert all(g is None or g < 0.3 for g in gaps), list(zip(gaps, alone, streamed, strict=True))
    assert any(g is None for g in gaps), gaps


@pytest.mark.model
def test_choices_sharing_their_prompts_cells_are_not_packed_apart(server):
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    packs = metric(server.url, "codeserve_kv_packs_total", model="smollm2-135m")
    out = oc.completions.create(
        model="smollm2-135m", prompt=PROMPTS[0], n=6, max_tokens=48, temperature=0.9, seed=3
    )
    assert len(out.choices) == 6
    assert metric(server.url, "codeserve_kv_packs_total", model="smollm2-135m") == packs


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


def test_sequences_in_the_shared_buffer_attend_to_their_own_cells_only(model_path, registry):
    """Eight sequences in one KV buffer, laid out as the engine leaves them (a run per prompt,
    then cells interleaved by steps taken together), give each sequence the logits it has alone.
    Attention skips other sequences' cells in blocks where llama.cpp is built with codeserve's
    patch (patches/): a block skipped wrongly would change the answers, not just the speed."""
    import numpy as np

    from tests.conftest import batch_context

    model = Model.load(model_path, registry.models["smollm2-135m"])
    # Prompts of lengths that leave runs of every alignment to the blocks of 16 cells.
    prompts = [
        model.tokenize(p + " ".join(["x"] * (5 * i + 7)) + ")", add_bos=True)
        for i, p in enumerate(PROMPTS)
    ]
    steps = 24
    shared = batch_context(model, n_ctx=4096, n_seq=8)
    alone = batch_context(model, n_ctx=512, n_seq=1)
    try:
        last: list[int] = []
        for seq, prompt in enumerate(prompts):
            shared.decode([(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)])
            last.append(int(np.argmax(shared.logits(len(prompt) - 1, model.n_vocab))))
        together: list[list[np.ndarray]] = [[] for _ in prompts]
        tokens: list[list[int]] = [[t] for t in last]
        for k in range(steps):
            shared.decode([(tokens[s][-1], len(p) + k, s, True) for s, p in enumerate(prompts)])
            for s in range(len(prompts)):
                row = shared.logits(s, model.n_vocab).copy()
                together[s].append(row)
                tokens[s].append(int(np.argmax(row)))
        for s, prompt in enumerate(prompts):
            alone.seq_rm(0, -1, -1)
            alone.decode([(t, i, 0, False) for i, t in enumerate(prompt)])
            for k in range(steps):
                alone.decode([(tokens[s][k], len(prompt) + k, 0, True)])
                row = alone.logits(0, model.n_vocab)
                assert np.abs(row - together[s][k]).max() < 1e-2, (s, k)
    finally:
        shared.close()
        alone.close()
        model.close()
