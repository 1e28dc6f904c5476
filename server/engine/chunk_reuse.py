"""Chunk reuse (llama-server's ``--cache-reuse``): keep a slot's KV cells for spans of a new prompt
that the slot already holds at another position.

A prompt that shares a prefix with a slot's cache and then differs (an edited line near the top of
a file, a context window that dropped a span) would otherwise evaluate everything after the
difference. Runs of cached tokens after the prefix that reappear in the prompt, each at least
``min_chunk`` tokens, keep their cells: the cells are moved to their new positions with
``llama_memory_seq_add``, which re-rotates their keys (RoPE), and only the other tokens are
evaluated. The moved cells were computed in their old context, so this is an approximation, the
one llama-server makes; a longer ``min_chunk`` keeps it to long spans.

llama-server reuses a chunk only where it sits at the prompt's current head, so it handles removed
spans but not an edited line (the new line's tokens are in no cached chunk). Here the tokens
between kept chunks (gaps: the edited line) are evaluated too, which needs care: llama.cpp only
accepts tokens for a sequence at the position right after the last one it holds (``Y = X + 1`` in
llama_batch_allocr), so a gap cannot be evaluated while the chunk after it already sits in the
sequence. The chunks are therefore parked in a scratch sequence, and each is copied back once the
gap before it is evaluated (see ``apply``). Gaps are evaluated at once, outside the engine's step
budget, so their total is bounded by ``max_gap`` (a step's prompt budget) and the plan stops at
the first chunk beyond it. The slot ends as it always is: a contiguous prefix of the prompt, cell
``i`` holding ``prompt[i]``, and the rest of the prompt is evaluated by the engine's steps.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.engine.sampling import common_prefix

log = logging.getLogger(__name__)

# Tokens hashed to find where a chunk may start; each candidate is then compared in full.
KEY = 8
# Candidate starts compared per prompt position: bounds the work on repetitive text (a chunk
# there is then found a little later, or not at all).
MAX_TRIES = 32


@dataclass(frozen=True)
class Chunk:
    src: int  # first position in the slot's cached tokens
    dst: int  # first position in the new prompt
    length: int


@dataclass(frozen=True)
class Plan:
    """Keep ``prefix`` cells in place, then each chunk moved from ``src`` to ``dst``; the prompt
    tokens between them are evaluated. The slot then holds ``prompt[:end]``."""

    prefix: int
    chunks: tuple[Chunk, ...] = ()

    @property
    def end(self) -> int:
        last = self.chunks[-1] if self.chunks else None
        return last.dst + last.length if last else self.prefix

    @property
    def reused(self) -> int:
        """Prompt tokens whose cells are kept rather than evaluated."""
        return self.prefix + sum(c.length for c in self.chunks)

    @property
    def moved(self) -> int:
        """Kept tokens whose cells change position (each move re-rotates the whole buffer)."""
        return sum(c.length for c in self.chunks if c.dst != c.src)

    @property
    def gap(self) -> int:
        """Prompt tokens evaluated between the kept spans."""
        return self.end - self.reused


def plan(
    cached: Sequence[int],
    prompt: Sequence[int],
    *,
    min_chunk: int,
    limit: int,
    max_gap: int,
    movable_from: int = 0,
) -> Plan:
    """Which of ``cached`` to keep for ``prompt``: its common prefix, then chunks of at least
    ``min_chunk`` tokens found after it in order, the slot holding at most ``limit`` tokens after
    (the engine keeps at least one prompt token to evaluate). Only cells from ``movable_from`` on
    may move (those before may be shared with other sequences, which a move would shift too).
    ``min_chunk`` 0 keeps the prefix only, as without chunk reuse.

    Greedy, like llama-server: the first chunk found scanning the prompt is taken, taken as long
    as it matches, and the scan goes on after it.
    """
    prefix = min(common_prefix(cached, prompt), limit)
    if min_chunk <= 0 or prefix >= limit:
        return Plan(prefix)
    first = max(prefix, movable_from)
    key = min(KEY, min_chunk)
    starts: dict[tuple[int, ...], list[int]] = {}
    for at in range(first, len(cached) - min_chunk + 1):
        starts.setdefault(tuple(cached[at : at + key]), []).append(at)
    if not starts:
        return Plan(prefix)
    chunks: list[Chunk] = []
    head_c, head_p, gaps = first, prefix, 0
    q = prefix
    while q < limit and q + min_chunk <= len(prompt) and gaps + q - head_p <= max_gap:
        c = _chunk_start(starts, cached, prompt, q, head_c, min_chunk, key)
        if c is None:
            q += 1
            continue
        n = min_chunk
        while c + n < len(cached) and q + n < len(prompt) and cached[c + n] == prompt[q + n]:
            n += 1
        n = min(n, limit - q)
        chunks.append(Chunk(c, q, n))
        gaps += q - head_p
        head_c, head_p = c + n, q + n
        q = head_p
    return Plan(prefix, tuple(chunks))


def _chunk_start(
    starts: dict[tuple[int, ...], list[int]],
    cached: Sequence[int],
    prompt: Sequence[int],
    q: int,
    head_c: int,
    min_chunk: int,
    key: int,
) -> int | None:
    """The first cached position from ``head_c`` where ``prompt[q:q + min_chunk]`` is found."""
    candidates = starts.get(tuple(prompt[q : q + key]))
    if not candidates:
        return None
    want = list(prompt[q : q + min_chunk])
    i = bisect.bisect_left(candidates, head_c)
    for c in candidates[i : i + MAX_TRIES]:
        if list(cached[c : c + min_chunk]) == want:
            return c
    return None


class KvCache(Protocol):
    """The llama.cpp memory operations ``apply`` needs (server.engine.binding.BatchContext)."""

    scratch_seq: int

    def seq_rm(self, seq: int, p0: int, p1: int) -> None: ...

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None: ...

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None: ...


def apply(
    kv: KvCache, seq: int, n_cached: int, prompt: Sequence[int], p: Plan, n_batch: int
) -> Plan:
    """Make sequence ``seq`` (holding ``n_cached`` cells) hold ``prompt[:p.end]`` as ``p`` says.

    The chunks are copied to the scratch sequence and dropped from ``seq`` with everything after
    the prefix. There they are moved first out of the way (past every position involved), then
    each to its place in the prompt, before any decode, so each cell is re-rotated once (llama.cpp
    adds up shifts until the next decode) and no move catches another chunk's cells. Then, in
    order, the gap before each chunk is evaluated in ``seq`` and the chunk is copied back.

    Returns the plan carried out: ``p``, or its prefix alone if a decode failed.
    """
    scratch = kv.scratch_seq
    for ch in p.chunks:
        kv.seq_cp(seq, scratch, ch.src, ch.src + ch.length)
    kv.seq_rm(seq, p.prefix, -1)
    if not p.chunks:
        return p
    park = max(n_cached, len(prompt))
    kv.seq_add(scratch, -1, -1, park)
    for ch in p.chunks:
        kv.seq_add(scratch, ch.src + park, ch.src + park + ch.length, ch.dst - ch.src - park)
    end = p.prefix
    try:
        for ch in p.chunks:
            for at in range(end, ch.dst, n_batch):
                upto = min(at + n_batch, ch.dst)
                kv.decode([(prompt[i], i, seq, False) for i in range(at, upto)])
            kv.seq_cp(scratch, seq, ch.dst, ch.dst + ch.length)
            kv.seq_rm(scratch, ch.dst, ch.dst + ch.length)
            end = ch.dst + ch.length
    except RuntimeError:
        log.warning("chunk reuse: evaluating a gap failed; keeping the common prefix only")
        kv.seq_rm(seq, p.prefix, -1)
        return Plan(p.prefix)
    finally:
        kv.seq_rm(scratch, -1, -1)
    return p


class ShiftCost:
    """Whether moving cells pays: llama.cpp re-rotates keys at the decode after a move. Released
    builds rotate every cell of the KV buffer (all slots, all layers), whatever was moved, so with
    a large buffer and a short chunk evaluating the chunk again is cheaper; codeserve's build
    (patches/) rotates only the span from the first moved cell to the last, a few milliseconds
    for a run of cells. Both costs are measured once on this context, in the scratch sequence,
    the first time a plan would move cells."""

    def __init__(self) -> None:
        self.shift_s: float | None = None  # what one move adds to a decode
        self.token_s = 0.0  # one prompt token evaluated in a batch

    def pays(self, kv: KvCache, p: Plan, filler: int, n_batch: int) -> bool:
        if not p.moved:
            return True
        if self.shift_s is None:
            self._measure(kv, filler, min(64, n_batch))
        assert self.shift_s is not None
        return p.moved * self.token_s > self.shift_s

    def _measure(self, kv: KvCache, filler: int, n: int) -> None:
        s = kv.scratch_seq

        def timed(entries: list[tuple[int, int, int, bool]]) -> float:
            t0 = time.perf_counter()
            kv.decode(entries)
            return time.perf_counter() - t0

        try:
            timed([(filler, i, s, False) for i in range(n)])  # warm-up
            kv.seq_rm(s, -1, -1)
            self.token_s = timed([(filler, i, s, False) for i in range(n)]) / n
            plain = timed([(filler, n, s, False)])
            kv.seq_add(s, 0, n + 1, 1)
            self.shift_s = max(0.0, timed([(filler, n + 2, s, False)]) - plain)
        finally:
            kv.seq_rm(s, -1, -1)
        log.info(
            "chunk reuse: moving cells costs %.1f ms a time, a prompt token %.2f ms: a move pays "
            "from %d tokens",
            self.shift_s * 1e3,
            self.token_s * 1e3,
            int(self.shift_s / self.token_s) + 1 if self.token_s else 0,
        )
