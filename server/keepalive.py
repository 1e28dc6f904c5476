"""How long an idle model stays loaded: Ollama's ``keep_alive`` values, in seconds.

Ollama (and so every client that speaks to it) writes durations the way Go does ("5m", "1h30m",
"300ms") or as a number of seconds; any negative value means "never unload" and 0 means "unload
as soon as the request is done". Go's duration grammar is a handful of unit suffixes, so it is
parsed here rather than through a general date library that would accept other spellings.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

NEVER = math.inf  # keep_alive < 0: stay loaded until unloaded explicitly or for memory

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")


def parse_keep_alive(value: object) -> float:
    """Seconds an idle model stays loaded (``NEVER`` for a negative value).

    Accepts a number of seconds, a Go duration string ("5m", "1h30m", "-1m"), or a number
    written as a string ("300", "-1"), as Ollama's OLLAMA_KEEP_ALIVE does.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(
            f'must be a duration such as "5m", "1h" or a number of seconds, got {value!r}'
        )
    if isinstance(value, int | float):
        if math.isnan(value):
            raise ValueError("must be a number of seconds, not NaN")
        return NEVER if value < 0 else float(value)
    text = value.strip()
    if _NUMBER.fullmatch(text):
        seconds = float(text)
        return NEVER if seconds < 0 else seconds
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    pos, total = 0, 0.0
    while pos < len(body):
        m = _PART.match(body, pos)
        if m is None:
            raise ValueError(
                f"invalid duration {value!r}: use a number of seconds or units ns, us, ms, s, m, h "
                'such as "30s", "5m" or "1h30m"'
            )
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError("invalid duration: empty string")
    return NEVER if sign < 0 and total > 0 else total


# A typed models.toml / request field: any of the spellings above, stored as seconds.
KeepAlive = Annotated[float, BeforeValidator(parse_keep_alive)]


def describe(seconds: float | None) -> str:
    """A keep_alive value as a user reads it back ("never", "5m0s" style kept short)."""
    if seconds is None:
        return "default"
    if seconds == NEVER:
        return "never"
    return f"{seconds:g}s"
