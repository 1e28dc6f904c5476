"""Stop rules that judge whole lines: llama-server's ``n_indent`` and ``t_max_predict_ms``.

Stop strings are the engine's (``server.engine.text.TextReleaser``); these rules need to see a
line's start before they can decide, so they run over a request's event stream here, usable by
any dialect. Text is held back until every rule agrees it survives, so a stream and a collected
answer end the same way. A choice a rule ends gets its own ``Finished`` (reason "length",
llama-server's stop type "limit"), and once every choice is over the stream is closed, which
cancels the generation in the engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.base import Delta, Event, Finished, Timings, TokenLogprob


class LineRule(Protocol):
    def check(self, text: str, now: float) -> tuple[int | None, int]:
        """For a choice's whole text so far: (where to cut it and stop, or None; how much of it
        may be released now)."""
        ...


@dataclass
class IndentFloor:
    """Every line after the first must be indented by at least ``n_indent`` spaces or tabs.

    As llama-server does: the first character of a line that is neither a space nor a tab (a
    newline included, so an empty line counts as indentation 0) decides; a line below the floor
    ends the completion, keeping that line's leading whitespace and nothing after it.
    """

    n_indent: int
    _line: int | None = None  # start of the first undecided line; None while on the first line

    def check(self, text: str, now: float) -> tuple[int | None, int]:
        while True:
            if self._line is None:
                nl = text.find("\n")
                if nl < 0:
                    return None, len(text)
                self._line = nl + 1
            start = i = self._line
            while i < len(text) and text[i] in " \t":
                i += 1
            if i == len(text):  # its indentation is not known yet: hold the line back
                return None, start
            if i - start < self.n_indent:
                return i, i
            nl = text.find("\n", i)
            if nl < 0:
                return None, len(text)
            self._line = nl + 1


@dataclass
class LineDeadline:
    """Once ``seconds`` have passed since the first token, stop at the next newline.

    llama-server's ``t_max_predict_ms``: the text generated so far is kept whole, so an editor
    never receives a line cut in the middle because time ran out.
    """

    seconds: float
    _start: float | None = None
    _seen: int = 0  # characters already searched for a newline

    def check(self, text: str, now: float) -> tuple[int | None, int]:
        if self._start is None:
            self._start = now
        fresh, self._seen = text[self._seen :], len(text)
        if "\n" in fresh and now - self._start > self.seconds:
            return len(text), len(text)
        return None, len(text)


@dataclass
class _Choice:
    rules: list[LineRule]
    text: str = ""
    released: int = 0
    tokens: int = 0  # generated tokens seen, whatever happened to their text
    first: float | None = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False

    def delta(self, index: int, end: int) -> Delta | None:
        if end <= self.released and not self.ids:
            return None
        out = Delta(index, self.text[self.released : end], tuple(self.ids), tuple(self.logprobs))
        self.released = max(self.released, end)
        self.ids, self.logprobs = [], []
        return out


async def apply_line_rules(
    events: AsyncIterator[Event],
    rules: Callable[[], list[LineRule]],
    *,
    n: int,
    prompt_tokens: int,
    started: float,
) -> AsyncIterator[Event]:
    """``events`` with ``rules()`` (fresh per choice) applied to each of ``n`` choices.

    ``started`` (a ``time.perf_counter()`` value) is when the request was submitted; it times the
    ``Finished`` of a choice a rule ends. That ``Finished`` cannot know how many prompt tokens the
    engine found cached, and reports none.
    """
    choices: dict[int, _Choice] = {}
    try:
        async for ev in events:
            if not isinstance(ev, Delta | Finished):
                yield ev
                continue
            c = choices.setdefault(ev.index, _Choice(rules()))
            if c.done:
                continue
            if isinstance(ev, Finished):
                out = c.delta(ev.index, len(c.text))
                if out is not None:
                    yield out
                c.done = True
                yield ev
                continue
            now = time.perf_counter()
            c.first = c.first if c.first is not None else now
            c.text += ev.text
            c.tokens += len(ev.token_ids)
            c.ids.extend(ev.token_ids)
            c.logprobs.extend(ev.logprobs)
            verdicts = [r.check(c.text, now) for r in c.rules]
            cuts = [cut for cut, _ in verdicts if cut is not None]
            cut = min(cuts) if cuts else None
            safe = min((s for _, s in verdicts), default=len(c.text))
            out = c.delta(ev.index, cut if cut is not None else safe)
            if out is not None:
                yield out
            if cut is None:
                continue
            c.done = True
            yield Finished(
                ev.index,
                "length",
                Timings(
                    prompt_tokens=prompt_tokens,
                    cached_tokens=0,
                    completion_tokens=c.tokens,
                    prompt_ms=(c.first - started) * 1e3,
                    decode_ms=(now - c.first) * 1e3,
                ),
            )
            if len(choices) == n and all(x.done for x in choices.values()):
                return  # closing the stream below cancels what the engine still generates
    finally:
        if isinstance(events, AsyncGenerator):
            await events.aclose()
