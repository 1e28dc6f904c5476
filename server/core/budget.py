"""How many tokens a completion may take: what was asked for, within what the context has left."""

from __future__ import annotations

from server.errors import ContextOverflow


def completion_budget(n_ctx: int, prompt_tokens: int, requested: int | None) -> int:
    """Tokens the completion may take: what was asked for, clamped to what the context has left.

    IDE clients send large defaults (Continue: 4096), so an over-large max_tokens is clamped and
    the choice ends with "length", as local servers do; a prompt that leaves no room is a 400.
    """
    room = n_ctx - prompt_tokens
    if room <= 0:
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
            f"{prompt_tokens} tokens; shorten the prompt.",
            param="prompt",
        )
    return room if requested is None else min(requested, room)
