"""Stop strings and text release: deltas never need taking back and add up to the final text."""

from __future__ import annotations

from server.engine.base import TokenLogprob
from server.engine.text import TextReleaser


def run(pieces: list[bytes], stop=()) -> tuple[list[str], str, bool, list[int]]:
    r = TextReleaser(stop)
    deltas, ids = [], []
    for i, p in enumerate(pieces):
        out = r.push(i, p)
        deltas.append(out.text)
        ids += out.token_ids
        if r.stopped:
            break
    tail = r.finish()
    deltas.append(tail.text)
    ids += tail.token_ids
    return deltas, "".join(deltas), r.stopped, ids


def test_no_stop_releases_every_piece_at_once():
    deltas, text, stopped, ids = run([b"def", b" f", b"():"])
    assert deltas[:3] == ["def", " f", "():"] and text == "def f():" and not stopped
    assert ids == [0, 1, 2]


def test_stop_spanning_tokens_is_cut_and_never_released():
    deltas, text, stopped, ids = run([b"a = 1", b"\n", b"\n", b"b = 2"], stop=["\n\n"])
    assert text == "a = 1" and stopped
    assert "\n" not in "".join(deltas)
    assert ids == [0], "tokens whose text was cut off entirely are not reported"


def test_prefix_of_stop_is_held_then_released():
    deltas, text, stopped, _ = run([b"x <", b"/", b"div>"], stop=["</end>"])
    assert deltas[0] == "x " and text == "x </div>" and not stopped


def test_earliest_stop_wins_among_many():
    stops = [f"zz{i}" for i in range(15)] + ["END", "ND"]
    _, text, stopped, _ = run([b"fooEN", b"D bar"], stop=stops)
    assert text == "foo" and stopped


def test_stop_inside_one_token():
    _, text, stopped, _ = run([b"return x;}\nmore"], stop=["}"])
    assert text == "return x;" and stopped


def test_held_text_flushed_at_the_end():
    _, text, stopped, _ = run([b"ab", b"c"], stop=["cd"])
    assert text == "abc" and not stopped


def test_utf8_split_across_tokens():
    snake = "🐍".encode()
    deltas, text, _, ids = run([b"x", snake[:2], snake[2:], b"y"])
    assert text == "x🐍y" and deltas[1] == "" and deltas[2] == "🐍"
    assert ids == [0, 1, 2, 3]


def test_logprob_offsets_follow_the_text():
    r = TextReleaser(["STOP"])
    lp = TokenLogprob(token="", logprob=-1.0, top={}, text_offset=-1)
    outs = [r.push(i, p, lp) for i, p in enumerate([b"ab", b"S", b"cd"])]
    offsets = [e.text_offset for o in outs for e in o.logprobs]
    assert offsets == [0, 2, 3]
