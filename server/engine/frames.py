"""When a choice's released text leaves the engine: at once for its first token, then several
tokens to a frame, none of them held longer than the interval.

Each frame a stream sends costs the event loop, the HTTP stack and the client a wake-up and some
hundreds of microseconds of CPU, taken from the cores llama.cpp decodes on; at a hundred tokens a
second one frame per token is that cost a hundred times a second. Text held a display refresh or
two (the default interval) looks the same to a reader, and it goes out the moment waiting for the
next token would hold its oldest part past the interval: with steps slower than the interval
(several streams at once, a larger model) every token is its own frame as before. The first token
and the last are never held. A collected answer (not streamed) holds everything after its first
release until it ends.
"""

from __future__ import annotations

import math

from server.engine.text import Released


class Frames:
    def __init__(self, interval_s: float, *, stream: bool):
        self.interval = interval_s if stream else math.inf
        self._held: Released | None = None  # None until the first release went out
        self._held_since = 0.0  # when the oldest text held now was released
        self._token_at = 0.0

    def push(self, out: Released, now: float) -> Released | None:
        """The text to send now (``out`` with what was held), or None: it is held."""
        gap, self._token_at = now - self._token_at, now
        if self._held is None:
            if not out:
                return None
            self._held = Released()
            return out
        if out and not self._held:
            self._held_since = now
        self._held.extend(out)
        # The next token is about one gap away: send now if waiting for it holds text too long.
        if self._held and now + gap - self._held_since >= self.interval:
            return self.take()
        return None

    def take(self) -> Released:
        """Everything held, now (the choice ends, or a long step is about to run)."""
        out = self._held or Released()
        if self._held is not None:
            self._held = Released()
        return out

    def before_long_step(self) -> Released | None:
        """A stream's held text, to send before a step that may run long (a prompt chunk, an
        admission); None when nothing is held or the answer is collected, not streamed."""
        if not self._held or self.interval == math.inf:
            return None
        return self.take()
