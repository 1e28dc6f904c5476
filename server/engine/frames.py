"""When a choice's released text leaves the engine: at once for its first token, then several
tokens to a frame while the next one is expected within the interval of the last frame.

Each frame a stream sends costs the event loop, the HTTP stack and the client a wake-up and some
hundreds of microseconds of CPU, taken from the cores llama.cpp decodes on; at a hundred tokens a
second one frame per token is that cost a hundred times a second. A text frame per display
refresh or so (the default interval) looks the same to a reader, and tokens still go out the
moment waiting for the next one would overrun the interval: with steps slower than half the
interval (several streams at once, a larger model) every token is its own frame as before. The
first token and the last are never held. A collected answer (not streamed) holds everything after
its first release until it ends.
"""

from __future__ import annotations

import math

from server.engine.text import Released


class Frames:
    def __init__(self, interval_s: float, *, stream: bool):
        self.interval = interval_s if stream else math.inf
        self._held: Released | None = None  # None until the first release went out
        self._sent_at = 0.0
        self._token_at = 0.0

    def push(self, out: Released, now: float) -> Released | None:
        """The text to send now (``out`` with what was held), or None: it is held."""
        gap, self._token_at = now - self._token_at, now
        if self._held is None:
            if not out:
                return None
            self._held, self._sent_at = Released(), now
            return out
        self._held.extend(out)
        # The next token is about one gap away: send now if waiting for it overruns the interval.
        if self._held and now - self._sent_at + gap >= self.interval:
            return self.take(now)
        return None

    def take(self, now: float) -> Released:
        """Everything held, now (the choice ends, or a long step is about to run)."""
        out = self._held or Released()
        if self._held is not None:
            self._held, self._sent_at = Released(), now
        return out

    def before_long_step(self, now: float) -> Released | None:
        """A stream's held text, to send before a step that may run long (a prompt chunk, an
        admission); None when nothing is held or the answer is collected, not streamed."""
        if not self._held or self.interval == math.inf:
            return None
        return self.take(now)
