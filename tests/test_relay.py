"""server.api.relay's choice of where request work runs."""

from __future__ import annotations

import asyncio
import threading

from server.api import relay


def test_short_text_is_tokenized_on_the_loop_and_long_text_on_a_thread():
    async def main() -> tuple[int, int, int]:
        here = threading.get_ident()
        short = await relay.tokenizing(relay.INLINE_CHARS - 1, threading.get_ident)
        long = await relay.tokenizing(relay.INLINE_CHARS, threading.get_ident)
        return here, short, long

    loop_thread, short, long = asyncio.run(main())
    assert short == loop_thread  # no hop for an editor's completion
    assert long != loop_thread  # a long prompt delays only its own request
