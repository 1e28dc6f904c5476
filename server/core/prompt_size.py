"""Refuse a prompt that cannot fit from its length in bytes, before paying to tokenize it.

No token covers more bytes of text than the model's longest token, so a text longer than
``n_ctx × longest`` bytes has more than ``n_ctx`` tokens whatever it says. Tokenizing megabytes
takes seconds of CPU; this check takes a byte count. For fill-in-the-middle, where long files
are cut to fit rather than refused, the same bound trims the text nobody would keep.
"""

from __future__ import annotations

import threading
import weakref

from server.engine.base import Engine
from server.errors import ContextOverflow

# Control tokens (<|im_start|>, <|fim_middle|>, ...) match their text in a prompt but detokenize
# to nothing, so the bound never goes below a length no control token's name reaches.
CONTROL_TOKEN_FLOOR = 64

_lock = threading.Lock()
_longest: dict[int, tuple[weakref.ref[Engine], int]] = {}


def longest_token_bytes(engine: Engine) -> int:
    """UTF-8 length of the longest text one token stands for; computed once per engine.

    One pass over the vocabulary, in the caller's thread (dialects call this off the event loop).
    """
    with _lock:
        hit = _longest.get(id(engine))
        if hit is not None and hit[0]() is engine:
            return hit[1]
        pieces = (len(engine.detokenize([t]).encode("utf-8")) for t in range(engine.info.n_vocab))
        longest = max(CONTROL_TOKEN_FLOOR, max(pieces, default=0))
        _longest[id(engine)] = (weakref.ref(engine), longest)
        return longest


def max_prompt_bytes(engine: Engine) -> int:
    """Bytes beyond which a text has more tokens than the context holds."""
    return engine.info.n_ctx * longest_token_bytes(engine)


def _may_exceed(engine: Engine, text: str) -> bool:
    # Cheap before any vocabulary pass: UTF-8 takes at most 4 bytes a character.
    return 4 * len(text) > engine.info.n_ctx * CONTROL_TOKEN_FLOOR


def check_prompt_bytes(engine: Engine, text: str, *, param: str = "prompt") -> None:
    """ContextOverflow (400 context_length_exceeded) for a text that cannot fit the context."""
    if not _may_exceed(engine, text):
        return
    size, limit = len(text.encode("utf-8")), max_prompt_bytes(engine)
    if size > limit:
        n_ctx = engine.info.n_ctx
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens; the prompt is {size} bytes, "
            f"more than any {n_ctx} of its tokens can spell ({limit} bytes); shorten the prompt.",
            param=param,
        )


def _utf8_head(text: str, limit: int) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def _utf8_tail(text: str, limit: int) -> str:
    return text.encode("utf-8")[-limit:].decode("utf-8", errors="ignore")


def trim_fim(engine: Engine, prefix: str, suffix: str) -> tuple[str, str]:
    """The end of the prefix and the start of the suffix that could still be in the prompt.

    A fill-in-the-middle prompt keeps the prefix's last tokens and the suffix's first, at most
    n_ctx of either; text beyond ``n_ctx × longest`` bytes from the cursor is always cut, so it
    is dropped before tokenizing. The cut edge lies beyond what the prompt keeps.
    """
    if not (_may_exceed(engine, prefix) or _may_exceed(engine, suffix)):
        return prefix, suffix
    limit = max_prompt_bytes(engine)
    if len(prefix) > limit // 4:
        prefix = _utf8_tail(prefix, limit)
    if len(suffix) > limit // 4:
        suffix = _utf8_head(suffix, limit)
    return prefix, suffix
