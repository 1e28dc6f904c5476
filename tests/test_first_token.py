"""A request's tokens are handed over before the engine's next step takes every core.

With llama.cpp's threads on all cores, the event loop that sends a token would wait behind them
for a scheduler slice, or preempt one mid-step. Both engines start a step once their consumers
have taken what they handed over (EventSink.wait_taken), a first token included.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from server.engine.base import (
    Delta,
    End,
    Engine,
    Event,
    GenerationRequest,
    SamplingParams,
    available_cores,
)
from server.engine.batched import BatchedEngine
from server.engine.llama import LlamaEngine
from server.engine.model import Model
from server.scheduler import Handover


def _timed(steps: list[float], step: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        steps.append(time.perf_counter())
        return step(*args, **kwargs)

    return run


def _batched(model_path, cfg, steps: list[float]) -> Engine:
    engine = BatchedEngine(Model.load(model_path, cfg), slots=2)
    engine._ctx.decode = _timed(steps, engine._ctx.decode)  # type: ignore[method-assign]
    return engine


def _simple(model_path, cfg, steps: list[float]) -> Engine:
    engine = LlamaEngine(model_path, cfg)
    engine.llm.eval = _timed(steps, engine.llm.eval)  # type: ignore[method-assign]
    return engine


def _all_cores(registry):
    return registry.models["smollm2-135m"].model_copy(
        update={"n_ctx": 512, "n_threads": available_cores(), "adapt_threads": False}
    )


class _SlowConsumer:
    """An EventSink whose consumer, on a thread of its own, takes each event a millisecond after
    it was handed over (formatting and sending it, as the event loop does)."""

    def __init__(self) -> None:
        self.handover = Handover()
        self.handed: list[tuple[float, Event]] = []
        self.taken: list[float] = []
        self.waits: list[float] = []
        self._queue: queue.Queue[Event] = queue.Queue()
        self.done = threading.Event()
        threading.Thread(target=self._consume, daemon=True).start()

    def __call__(self, event: Event) -> None:
        self.handed.append((time.perf_counter(), event))
        self.handover.handed()
        self._queue.put(event)

    def wait_taken(self, timeout_s: float) -> bool:
        self.waits.append(time.perf_counter())
        return self.handover.wait_taken(timeout_s)

    def _consume(self) -> None:
        while True:
            event = self._queue.get()
            time.sleep(0.001)
            self.taken.append(time.perf_counter())
            self.handover.took()
            if isinstance(event, End):
                self.done.set()
                return


@pytest.mark.parametrize("make", [_batched, _simple], ids=["batched", "simple"])
def test_an_engine_steps_once_its_consumer_took_the_last_steps_tokens(make, model_path, registry):
    steps: list[float] = []
    engine = make(model_path, _all_cores(registry), steps)
    sink = _SlowConsumer()
    try:
        prompt = engine.tokenize("def fibonacci(n):\n", add_bos=True)
        engine.submit(GenerationRequest(prompt, 12, sampling=SamplingParams(temperature=0)), sink)
        assert sink.done.wait(60)
    finally:
        engine.close()
    handed = [t for t, _ in sink.handed]
    deltas = [i for i, (_, e) in enumerate(sink.handed) if isinstance(e, Delta) and e.token_ids]
    assert len(deltas) >= 10
    late = []
    for i in deltas:
        after = [t for t in steps if t > handed[i]]
        if not after:
            continue
        # Before each step that follows a token, the engine asked to wait until it was taken (the
        # first token included): that is its part, independent of how the threads were scheduled.
        assert any(handed[i] < w < after[0] for w in sink.waits), f"no wait after token {i}"
        if after[0] < sink.taken[i]:
            late.append(i)
    # And the wait worked: most tokens were taken before the next step started (a wait is
    # bounded, so a consumer thread not scheduled in time on a loaded machine may miss some).
    assert len(late) <= len(deltas) // 4, late
