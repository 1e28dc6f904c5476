"""A host-RAM cache of evaluated prompts: the sequence states of slots whose KV cells were freed.

The batched engine frees idle caches' cells when the next request starts (idle cells slow every
step). When it drops one, its sequence state (llama.cpp's per-sequence state: the KV cells of
that sequence) is saved here, least recently used first out, bounded in bytes; a later prompt
that shares a long prefix with a saved state restores it into a free slot instead of evaluating
that prefix again (an editor going back to a file it showed before).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.sampling import common_prefix

# Shorter prefixes are evaluated again: restoring costs a copy of the state, and a few tokens
# are cheap to evaluate; an editor's short completion prompts are not (a step per batch of them).
MIN_REUSE = 8
MIN_CUT = 64


@dataclass(frozen=True)
class Saved:
    tokens: tuple[int, ...]
    state: bytes


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], Saved] = OrderedDict()
        self.bytes_held = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def worth_saving(self, tokens: Sequence[int]) -> bool:
        return self.max_bytes > 0 and len(tokens) >= MIN_REUSE

    def worth_saving_before_cut(self, tokens: Sequence[int], keep: int) -> bool:
        """Whether a cache about to lose all but ``keep`` tokens is worth saving whole first: when
        (nearly) all of it goes, or a long tail (a completion's few generated tokens are not worth
        a copy of the state, which would push older prompts out)."""
        losing_most = keep < MIN_REUSE or len(tokens) - keep >= MIN_CUT
        return losing_most and self.worth_saving(tokens)

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether exactly this sequence is saved already (a restored one, say)."""
        return tuple(tokens) in self._entries

    def put(self, tokens: Sequence[int], state: bytes) -> None:
        """Keep a state; entries it extends (their tokens are its prefix) are dropped."""
        key = tuple(tokens)
        if len(state) > self.max_bytes:
            return
        for other in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(other)
        self._entries[key] = Saved(key, state)
        self.bytes_held += len(state)
        while self.bytes_held > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def take(self, prompt: Sequence[int], better_than: int) -> Saved | None:
        """The saved state sharing the longest prefix with ``prompt`` if that prefix is longer than
        ``better_than`` (what a resident slot already offers) and worth a restore; counted as a
        hit, or a miss when the prompt was long enough to be worth one."""
        best: Saved | None = None
        best_len = max(better_than, MIN_REUSE - 1)
        for saved in self._entries.values():
            n = common_prefix(saved.tokens, prompt)
            if n > best_len:
                best, best_len = saved, n
        if best is not None:
            self.hits += 1
            self._entries.move_to_end(best.tokens)
        elif len(prompt) >= MIN_REUSE and better_than < MIN_REUSE:
            self.misses += 1
        return best

    def _drop(self, key: tuple[int, ...]) -> None:
        saved = self._entries.pop(key)
        self.bytes_held -= len(saved.state)
