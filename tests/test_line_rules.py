"""The core's line rules (n_indent, t_max_predict_ms) and the native stream's error event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from server.api.llamacpp.generate import _frames
from server.api.llamacpp.protocol import CompletionRequest
from server.api.llamacpp.response import Answer
from server.core.line_rules import IndentFloor, LineDeadline, apply_line_rules
from server.engine.base import Delta, Event, Finished, SamplingParams, Timings
from server.errors import Overloaded

T = Timings(prompt_tokens=3, cached_tokens=0, completion_tokens=9, prompt_ms=1, decode_ms=1)


def test_indent_floor_follows_llama_server():
    rule = IndentFloor(4)
    assert rule.check("x = 1", 0) == (None, 5)  # the first line is never judged
    assert rule.check("x = 1\n  ", 0) == (None, 6)  # indentation not known yet: held back
    assert rule.check("x = 1\n      y\n", 0) == (None, 14)
    # A line below the floor ends it, keeping that line's whitespace only.
    assert IndentFloor(4).check("a\n    b\n  c = 2", 0) == (10, 10)
    # An empty line is indentation 0.
    assert IndentFloor(4).check("a\n\n    b", 0) == (2, 2)
    assert IndentFloor(1).check("a\n\tb\n c", 0) == (None, 7)


def test_line_deadline_waits_for_a_newline():
    rule = LineDeadline(0.5)
    assert rule.check("a", 10.0) == (None, 1)
    assert rule.check("ab\n", 10.2) == (None, 3)  # a newline, but in time
    assert rule.check("ab\ncd", 11.0) == (None, 5)  # late, but mid-line
    assert rule.check("ab\ncd\nef", 11.1) == (8, 8)


async def _events(*items: Event) -> AsyncIterator[Event]:
    for ev in items:
        yield ev


def _collect(it: AsyncIterator[Event]) -> list[Event]:
    async def run() -> list[Event]:
        return [ev async for ev in it]

    return asyncio.run(run())


def test_apply_rules_cuts_and_finishes_the_choice():
    upstream = _events(
        Delta(0, "x = 1\n", (1, 2)),
        Delta(0, "  ", (3,)),
        Delta(0, "  y\n", (4,)),
        Delta(0, "z", (5,)),
        Delta(0, " = 2", (6,)),
        Finished(0, "length", T),
    )
    out = _collect(
        apply_line_rules(upstream, lambda: [IndentFloor(4)], n=1, prompt_tokens=3, started=0)
    )
    text = "".join(e.text for e in out if isinstance(e, Delta))
    assert text == "x = 1\n    y\n"
    ids = [t for e in out if isinstance(e, Delta) for t in e.token_ids]
    assert ids == [1, 2, 3, 4, 5]
    fin = [e for e in out if isinstance(e, Finished)]
    assert len(fin) == 1 and fin[0].reason == "length" and fin[0].timings.completion_tokens == 5


def test_apply_rules_flushes_held_text_at_the_end():
    upstream = _events(Delta(0, "a\n  ", (1,)), Finished(0, "stop", T))
    out = _collect(
        apply_line_rules(upstream, lambda: [IndentFloor(4)], n=1, prompt_tokens=3, started=0)
    )
    assert "".join(e.text for e in out if isinstance(e, Delta)) == "a\n  "
    assert out[-1] == Finished(0, "stop", T)


def test_an_error_mid_stream_is_the_last_event():
    async def failing() -> AsyncIterator[Event]:
        yield Delta(0, "ab", (1,))
        raise Overloaded("queue full")

    answer = Answer(
        body=CompletionRequest(prompt="x"),
        model="m",
        prompt_ids=[1],
        prompt_text="x",
        sampling=SamplingParams(),
        samplers=[],
        n_predict=4,
    )

    async def run() -> list[dict]:
        frames = [f async for f in _frames(failing(), answer)]
        assert all(f.startswith(b"data: ") and f.endswith(b"\n\n") for f in frames), frames
        return [json.loads(f[6:]) for f in frames]

    frames = asyncio.run(run())
    assert frames[0]["content"] == "ab"
    assert frames[-1] == {
        "error": {"code": 429, "message": "queue full", "type": "unavailable_error"}
    }
