"""The worker queue: FIFO, bounded, cancellable, with a scheduling deadline (fake engine)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.engine.base import Delta, Finished, GenerationRequest
from server.errors import Overloaded, QueueTimeout, ShuttingDown
from server.scheduler import Handover, ModelWorker
from tests.fakes import FakeEngine


def req(tag: int, max_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(prompt=[tag], max_tokens=max_tokens)


async def drain(worker: ModelWorker, r: GenerationRequest) -> list:
    return [ev async for ev in worker.stream(r)]


def run(coro):
    return asyncio.run(coro)


def test_events_and_fifo_order():
    async def main():
        engine = FakeEngine()
        w = ModelWorker("m", engine, queue_size=8, queue_timeout_s=5)
        results = await asyncio.gather(*(drain(w, req(i)) for i in range(4)))
        w.close()
        return engine, results

    engine, results = run(main())
    assert engine.served == [[0], [1], [2], [3]]
    for events in results:
        assert [type(e) for e in events] == [Delta, Delta, Delta, Finished]
        assert events[-1].reason == "length"


def test_full_queue_raises_overloaded():
    async def main():
        w = ModelWorker("m", FakeEngine(token_s=0.05), queue_size=1, queue_timeout_s=5)
        first = asyncio.ensure_future(drain(w, req(0, 10)))
        await asyncio.sleep(0.05)  # the worker has taken the first request
        second = asyncio.ensure_future(drain(w, req(1)))
        await asyncio.sleep(0.01)  # the second is waiting in the queue
        with pytest.raises(Overloaded, match="retry later"):
            await drain(w, req(2))
        await asyncio.gather(first, second)
        w.close()

    run(main())


def test_request_not_scheduled_in_time_fails_clearly():
    async def main():
        engine = FakeEngine(token_s=0.05)
        w = ModelWorker("m", engine, queue_size=4, queue_timeout_s=0.2)
        first = asyncio.ensure_future(drain(w, req(0, 20)))  # holds the worker ~1 s
        await asyncio.sleep(0.01)
        with pytest.raises(QueueTimeout, match="without being scheduled"):
            await drain(w, req(1))
        await first
        w.close()
        return engine

    engine = run(main())
    assert engine.served == [[0]], "the timed-out request never reached the engine"


def test_cancelled_while_queued_costs_the_engine_nothing():
    async def main():
        engine = FakeEngine(token_s=0.02)
        w = ModelWorker("m", engine, queue_size=64, queue_timeout_s=5)
        busy = asyncio.ensure_future(drain(w, req(0, 10)))
        await asyncio.sleep(0.01)
        aborted = [asyncio.ensure_future(drain(w, req(100 + i))) for i in range(20)]
        await asyncio.sleep(0.01)
        for t in aborted:
            t.cancel()
        await asyncio.gather(*aborted, return_exceptions=True)
        await busy
        last = await drain(w, req(1))
        w.close()
        return engine, last

    engine, last = run(main())
    assert engine.served == [[0], [1]]
    assert last[-1].reason == "length"


def test_leaving_mid_stream_cancels_within_a_token():
    async def main():
        engine = FakeEngine(token_s=0.01)
        w = ModelWorker("m", engine, queue_size=4, queue_timeout_s=5)
        stream = w.stream(req(0, 1000))
        async for ev in stream:
            if isinstance(ev, Delta) and ev.token_ids == (3,):
                break
        await stream.aclose()
        t0 = time.perf_counter()
        events = await drain(w, req(1, 2))
        waited = time.perf_counter() - t0
        w.close()
        return events, waited

    events, waited = run(main())
    assert events[-1].reason == "length" and len(events) == 3
    assert waited < 0.5, "the abandoned 1000-token request (10 s) still held the worker"


def test_a_burst_is_admitted_up_to_capacity_plus_queue():
    async def main():
        engine = FakeEngine(token_s=0.02, capacity=8)
        w = ModelWorker("m", engine, queue_size=4, queue_timeout_s=5)
        results = await asyncio.gather(
            *(drain(w, req(i, 5)) for i in range(40)), return_exceptions=True
        )
        w.close()
        return engine, results

    engine, results = run(main())
    admitted = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(admitted) == 12 and len(refused) == 28
    assert engine.most_running == 8, "the engine got more than its capacity at once"


def test_a_client_leaving_the_queue_frees_its_place_at_once():
    async def main():
        w = ModelWorker("m", FakeEngine(token_s=0.05), queue_size=1, queue_timeout_s=5)
        busy = asyncio.ensure_future(drain(w, req(0, 10)))
        await asyncio.sleep(0.01)
        ghost = asyncio.ensure_future(drain(w, req(1)))
        await asyncio.sleep(0.01)
        assert w.queue_depth == 1
        ghost.cancel()
        await asyncio.gather(ghost, return_exceptions=True)
        assert w.queue_depth == 0, "a request whose client left still holds a queue place"
        live = await drain(w, req(2))  # not refused: the ghost's place is free
        await busy
        w.close()
        return live

    assert run(main())[-1].reason == "length"


def test_an_engine_failure_reaches_the_stream():
    async def main():
        w = ModelWorker("m", FakeEngine(fail_after=2), queue_size=1, queue_timeout_s=5)
        got = []
        with pytest.raises(RuntimeError, match="llama_decode"):
            async for ev in w.stream(req(0, 10)):
                got.append(ev)
        after = await drain(w, req(1, 2))  # the worker is still usable
        w.close()
        return got, after

    got, after = run(main())
    assert len(got) == 2 and after[-1].reason == "length"


def test_drain_fails_the_waiting_and_stops_the_running_within_the_bound():
    async def main():
        w = ModelWorker("m", FakeEngine(token_s=0.01), queue_size=4, queue_timeout_s=5)
        running = asyncio.ensure_future(drain(w, req(0, 10_000)))
        short = asyncio.ensure_future(drain(w, req(1, 2)))  # waits behind it
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await w.drain(0.2)
        took = time.perf_counter() - t0
        results = await asyncio.gather(running, short, return_exceptions=True)
        with pytest.raises(ShuttingDown):
            await drain(w, req(2))
        w.close()
        return took, results

    took, (running, short) = run(main())
    assert isinstance(short, ShuttingDown)
    assert isinstance(running, ShuttingDown), "a stream cut by shutdown must end with an error"
    assert took < 1.0


def test_an_engine_waiting_for_its_consumer_resumes_once_each_token_was_sent():
    async def main():
        engine = FakeEngine(token_s=0.001, wait_taken_s=5.0)
        w = ModelWorker("m", engine, queue_size=8, queue_timeout_s=5)
        sent = []
        async for ev in w.stream(req(0, 5)):
            if isinstance(ev, Delta):
                await asyncio.sleep(0.02)  # formatting and writing it
                sent.append(time.perf_counter())
        w.close()
        return engine.waits, sent

    waits, sent = run(main())
    assert len(waits) == len(sent) == 5
    for (_, end, taken), t in zip(waits, sent, strict=True):
        assert taken and end >= t


def test_a_consumer_that_left_is_not_waited_for():
    async def main():
        engine = FakeEngine(token_s=0.001, wait_taken_s=5.0)
        w = ModelWorker("m", engine, queue_size=8, queue_timeout_s=5)
        stream = w.stream(req(0, 50))
        await anext(stream)
        await stream.aclose()  # the client left with tokens still being handed over
        while engine.running:
            await asyncio.sleep(0.01)
        w.close()
        return engine.waits

    waits = run(main())
    assert waits and all(end - start < 1.0 for start, end, _ in waits)


def _took_later(h: Handover, delay_s: float) -> None:
    threading.Timer(delay_s, h.took).start()


def test_a_handover_waits_for_every_event_handed_over():
    h = Handover()
    assert h.wait_taken(0.0)  # nothing handed over yet
    h.handed()
    h.handed()
    _took_later(h, 0.01)
    _took_later(h, 0.03)
    t0 = time.perf_counter()
    assert h.wait_taken(5.0)
    assert time.perf_counter() - t0 >= 0.03


def test_a_consumer_that_fell_behind_is_not_waited_for_until_it_catches_up():
    h = Handover()
    h.handed()
    assert not h.wait_taken(0.01)  # the consumer does not read
    h.handed()
    t0 = time.perf_counter()
    assert not h.wait_taken(5.0)
    assert time.perf_counter() - t0 < 0.5, "a lagging consumer costs one wait, not every one"
    h.took()
    h.took()  # caught up
    h.handed()
    _took_later(h, 0.01)
    assert h.wait_taken(5.0)
