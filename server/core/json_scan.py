"""Scanning a JSON object that may still be arriving: where its values start and end.

The tool-call parser needs positions in the model's raw text (to stream a call's arguments as the
exact text that will make up its final ``arguments``), which a JSON decoder does not give; this
scanner only locates, and leaves decoding of complete strings to ``json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_SCALAR = re.compile(r"[^,}\]\s]*")
_WS = re.compile(r"[ \t\r\n]*")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STRUCTURAL = re.compile(r'[{}\[\]"]')


class Malformed(Exception):
    """The text is not a JSON object (of the kind a tool call is)."""


@dataclass
class ObjectScan:
    """What is known so far about one JSON object in the buffer."""

    end: int | None = None  # index after its closing brace
    name: str | None = None
    args: tuple[int, int | None] | None = None  # span of the raw arguments value
    args_is_string: bool = False


def skip_ws(s: str, i: int) -> int:
    return _WS.match(s, i).end()  # type: ignore[union-attr]  # matches the empty string too


def _string_end(s: str, i: int) -> int | None:
    """Index after the JSON string starting at ``s[i] == '"'``, or None if it is unfinished."""
    m = _STRING.match(s, i)
    return m.end() if m else None


def _value_end(s: str, i: int) -> int | None:
    """Index after the JSON value starting at ``s[i]``, or None if it may still grow."""
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        # Regexes jump between brackets and strings: the text is rescanned as it grows.
        depth, j = 0, i
        while (m := _STRUCTURAL.search(s, j)) is not None:
            c, j = m.group(), m.start()
            if c == '"':
                end = _string_end(s, j)
                if end is None:
                    return None
                j = end
                continue
            depth += 1 if c in "{[" else -1
            j += 1
            if depth == 0:
                return j
        return None
    m = _SCALAR.match(s, i)
    end = m.end() if m else i
    if end == i:
        raise Malformed
    return end if end < len(s) else None


def scan_object(s: str, i: int) -> ObjectScan:
    """Scans the object at ``s[i] == '{'`` as far as the buffer goes."""
    out = ObjectScan()
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == "}":
        out.end = j + 1
        return out
    while j < len(s):
        if s[j] != '"':
            raise Malformed
        kend = _string_end(s, j)
        if kend is None:
            return out
        key = json.loads(s[j:kend])
        j = skip_ws(s, kend)
        if j >= len(s):
            return out
        if s[j] != ":":
            raise Malformed
        j = skip_ws(s, j + 1)
        if j >= len(s):
            return out
        vend = _value_end(s, j)
        if key in ("arguments", "parameters") and out.args is None:
            out.args, out.args_is_string = (j, vend), s[j] == '"'
        if vend is None:
            return out
        if key == "name" and s[j] == '"':
            out.name = json.loads(s[j:vend])
        j = skip_ws(s, vend)
        if j >= len(s):
            return out
        if s[j] == "}":
            out.end = j + 1
            return out
        if s[j] != ",":
            raise Malformed
        j = skip_ws(s, j + 1)
    return out
