"""Frames: a stream's first token at once, then no token held longer than the interval."""

from __future__ import annotations

import openai
import pytest

from server.engine.frames import Frames
from server.engine.text import Released
from tests.conftest import LiveServer, make_settings


def tokens(n: int) -> list[Released]:
    return [Released(f"t{i} ", [i]) for i in range(n)]


def sent(frames: Frames, outs: list[Released], gap_s: float) -> list[list[int]]:
    """The token ids of each frame sent, tokens arriving ``gap_s`` apart, then the end."""
    got = []
    for i, out in enumerate(outs):
        frame = frames.push(out, i * gap_s)
        if frame is not None:
            got.append(frame.token_ids)
    if tail := frames.take():
        got.append(tail.token_ids)
    return got


def test_fast_tokens_share_frames_and_slow_ones_go_alone():
    assert sent(Frames(0.030, stream=True), tokens(7), 0.012) == [[0], [1, 2, 3], [4, 5, 6]]
    assert sent(Frames(0.030, stream=True), tokens(4), 0.016) == [[0], [1, 2], [3]]
    assert sent(Frames(0.030, stream=True), tokens(3), 0.031) == [[0], [1], [2]]
    assert sent(Frames(0.0, stream=True), tokens(3), 0.001) == [[0], [1], [2]]
    # Interval 0: every token alone, even tokens of one step (accepted drafts).
    assert sent(Frames(0.0, stream=True), tokens(3), 0.0) == [[0], [1], [2]]


@pytest.mark.parametrize("gap_s", [0.001, 0.004, 0.010, 0.012, 0.016, 0.025, 0.029, 0.031, 0.2])
def test_no_token_waits_longer_than_the_interval_nor_goes_out_sooner_than_it_must(gap_s):
    frames, sent_ids = Frames(0.030, stream=True), []
    for i, out in enumerate(tokens(40)):
        if (frame := frames.push(out, i * gap_s)) is not None:
            sent_ids += frame.token_ids
            if i == 0:
                continue  # the first token goes at once
            # It leaves at token i's time; its oldest token came at token_ids[0]'s ...
            oldest = frame.token_ids[0]
            assert (i - oldest) * gap_s <= 0.030 + 1e-9
            # ... and waiting for the next token would have held that one too long.
            assert (i + 1 - oldest) * gap_s > 0.030 - 1e-9
    assert sent_ids + frames.take().token_ids == list(range(40))


def test_a_collected_answer_holds_everything_after_its_first_release():
    assert sent(Frames(0.030, stream=False), tokens(5), 0.5) == [[0], [1, 2, 3, 4]]
    f = Frames(0.030, stream=False)
    f.push(Released("a", [1]), 0.0)
    f.push(Released("b", [2]), 0.5)
    assert f.before_long_step() is None  # nobody reads it before the end


def test_half_a_character_waits_for_the_first_release():
    f = Frames(0.030, stream=True)
    assert f.push(Released(), 0.0) is None  # half a UTF-8 sequence: nothing released yet
    assert f.take().token_ids == [] and f.before_long_step() is None
    first = f.push(Released("é", [7, 8]), 0.01)
    assert first is not None and first.token_ids == [7, 8]


def test_held_text_goes_out_before_a_long_step():
    f = Frames(1.0, stream=True)
    f.push(Released("a", [1]), 0.0)
    assert f.push(Released("b", [2]), 0.01) is None
    held = f.before_long_step()
    assert held is not None and held.text == "b" and f.before_long_step() is None
    assert f.push(Released("c", [3]), 0.03) is None  # a new hold starts


@pytest.fixture(scope="module")
def slow_frames(registry):
    live = LiveServer(make_settings(stream_frame_ms=1000), registry).start()
    yield live
    live.stop()


def test_a_stream_in_frames_carries_every_token_and_its_first_at_once(slow_frames):
    client = openai.OpenAI(base_url=slow_frames.url + "/v1", api_key="none")
    body = {"model": "smollm2-135m", "prompt": "def add(a, b):", "max_tokens": 48}
    whole = client.completions.create(**body, temperature=0)
    chunks = list(client.completions.create(**body, temperature=0, stream=True, logprobs=0))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == whole.choices[0].text
    per_frame = [len(c.choices[0].logprobs.tokens) for c in chunks if c.choices[0].logprobs]
    assert per_frame[0] == 1  # the first token is never held
    assert sum(per_frame) == whole.usage.completion_tokens
    assert len(per_frame) < sum(per_frame)  # the rest came several to a frame
