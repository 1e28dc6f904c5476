"""A request's first token is handed over before the engine's next step takes every core.

With llama.cpp's threads on all cores, the event loop that sends a first token would wait behind
them for a scheduler slice; both engines hand the token over and pause before their next step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from server.engine.base import (
    FIRST_TOKEN_YIELD_S,
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


@pytest.mark.parametrize("make", [_batched, _simple], ids=["batched", "simple"])
def test_a_first_token_is_handed_over_before_the_next_step(make, model_path, registry):
    cfg = registry.models["smollm2-135m"].model_copy(
        update={"n_ctx": 512, "n_threads": available_cores(), "adapt_threads": False}
    )
    steps: list[float] = []
    engine = make(model_path, cfg, steps)
    events: list[tuple[float, Event]] = []
    done = threading.Event()

    def sink(event: Event) -> None:
        events.append((time.perf_counter(), event))
        if isinstance(event, End):
            done.set()

    try:
        prompt = engine.tokenize("def fibonacci(n):\n", add_bos=True)
        engine.submit(GenerationRequest(prompt, 6, sampling=SamplingParams(temperature=0)), sink)
        assert done.wait(60)
    finally:
        engine.close()
    deltas = [t for t, e in events if isinstance(e, Delta) and e.token_ids]
    assert len(deltas) >= 2 and isinstance(events[-1][1], End)
    after_first = [t for t in steps if t > deltas[0]]
    assert after_first, "the step after the first token never ran"
    assert after_first[0] - deltas[0] >= FIRST_TOKEN_YIELD_S
