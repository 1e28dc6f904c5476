"""Turn a stream of token pieces into released text, honouring stop strings.

Text that might be the beginning of a stop string is held back until the next token decides it,
so what is released never has to be taken back and a stream's deltas add up to the final text.
Shared by every engine: the rules are the API's, not llama.cpp's.
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.base import TokenLogprob


@dataclass
class Released:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.token_ids)

    def extend(self, more: Released) -> None:
        self.text += more.text
        self.token_ids.extend(more.token_ids)
        self.logprobs.extend(more.logprobs)


@dataclass
class _Pending:
    token_id: int
    start: int  # absolute character offset of the token's first character
    logprob: TokenLogprob | None


class TextReleaser:
    def __init__(self, stop: Sequence[str] = ()):
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # decoded but unreleased
        self._released_chars = 0  # absolute offset of self._text[0]
        self._tokens: list[_Pending] = []
        self.stopped = False

    def push(self, token_id: int, piece: bytes, logprob: TokenLogprob | None = None) -> Released:
        """Add one generated token; returns what became safe to release."""
        if not self._stops and logprob is None and not self._tokens:
            # Nothing held and nothing to hold for: a token with whole characters goes straight
            # out (most tokens of most requests; this runs between two decode steps).
            text = self._decoder.decode(piece)
            if text:
                self._released_chars += len(text)
                return Released(text, [token_id])
            self._tokens.append(_Pending(token_id, self._released_chars, None))
            return Released()
        start = self._released_chars + len(self._text)
        if logprob is not None:
            logprob = dataclasses.replace(logprob, text_offset=start)
        self._tokens.append(_Pending(token_id, start, logprob))
        self._text += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> Released:
        """The generation ended: flush whatever is held back (a stop string may still match)."""
        if self.stopped:
            return Released()
        self._text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> Released:
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out = self._take(cut)
            self._text, self._tokens = "", []
            return out
        if final:
            return self._take(len(self._text), every_token=True)
        return self._take(len(self._text) - self._held_suffix())

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _held_suffix(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, n: int, *, every_token: bool = False) -> Released:
        end = self._released_chars + n
        # A token goes out with the release that carries its first character; a token with no text
        # of its own yet (half a UTF-8 sequence) goes out with the text that completes it.
        taken = self._tokens if every_token else [t for t in self._tokens if t.start < end]
        self._tokens = self._tokens[len(taken) :]
        out = Released(
            text=self._text[:n],
            token_ids=[t.token_id for t in taken],
            logprobs=[t.logprob for t in taken if t.logprob is not None],
        )
        self._text = self._text[n:]
        self._released_chars = end
        return out
