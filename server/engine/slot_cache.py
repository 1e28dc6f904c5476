"""Which slot a new prompt starts in, which cached cells it keeps, and which idle caches stay.

Every slot keeps its KV cache after its request, for the next prompt sharing a prefix. A new
prompt takes the free slot it can reuse most of (a common prefix, plus runs after an edited span
moved into place: server.engine.chunk_reuse), or a saved state from the host-RAM prompt cache
(server.engine.prompt_cache) when that offers more. When a request starts, the other idle caches
are saved to host RAM and their cells freed; with no host-RAM cache they stay in the KV buffer
while they fit in a small budget of cells. And where the slots' cells lie in the one KV buffer they
share: packed into one run per slot after a burst has left holes, and between steps once sequences
decoding together have interleaved theirs (SlotCaches.pack).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server.engine import chunk_reuse
from server.engine.batch_state import Slot
from server.engine.binding import BatchContext
from server.engine.model import Model
from server.engine.prompt_cache import MIN_REUSE, PromptCache
from server.engine.sampling import common_prefix

log = logging.getLogger(__name__)

# With no host-RAM prompt cache, idle slots' KV caches stay in the buffer, most recently used
# first, while their cells fit in this budget (see SlotCaches.forget_idle); the others are lost.
IDLE_CELLS = 512
# Packing the idle caches back to the start of the buffer (SlotCaches.pack) is worth its copies
# once the cells it could free above them number at least this many and at least as many as they
# hold (llama.cpp pads the attention span to 256 cells).
PACK_SLACK = 256
# Sequences decoding together get their new cells side by side, a cell each per step, and
# attention over cells interleaved that way is slower than over a sequence's own run of cells
# (bench/results/2026-11-24-kv-interleave.md). Packing every slot, the busy ones too, makes each
# a run again; it pays once this many cells were interleaved and an eighth of those held (the
# copies cost in proportion to the cells held).
PACK_INTERLEAVED = 128


@dataclass(frozen=True)
class Placement:
    slot: Slot  # holds prompt[:end] once placed
    cached: int  # prompt tokens whose cells came from a cache
    end: int  # prompt[end:] is left to evaluate


class SlotCaches:
    def __init__(
        self,
        ctx: BatchContext,
        model: Model,
        slots: list[Slot],
        prompt_cache: PromptCache,
        n_batch: int,
    ):
        self._ctx = ctx
        self._model = model
        self._slots = slots
        self.prompt_cache = prompt_cache
        self._n_batch = n_batch
        self._shift_cost = chunk_reuse.ShiftCost()
        self._peak = 0  # the most cells the slots held at once since the buffer was last packed
        self._interleaved = 0  # cells decoded beside other sequences' since the last pack
        self.packs = 0

    def place(
        self,
        prompt: list[int],
        free: list[Slot],
        *,
        cold: bool,
        budget: int,
        logits_kept: bool = False,
    ) -> Placement:
        """Choose the slot for ``prompt`` among ``free`` and leave in it the cells it reuses.

        ``cold``: reuse nothing; ``budget``: the most tokens a chunk of reused cells may be
        evaluated ahead of at once (a step's prompt budget); ``logits_kept``: the logits after the
        whole prompt are at hand, so all of it may come from the cache.
        """
        # Else keep at least one prompt token to evaluate: its logits start every choice.
        limit = 0 if cold else len(prompt) if logits_kept else len(prompt) - 1
        # Cells move only where the model's positions allow it.
        min_chunk = self._model.cfg.cache_reuse if self._ctx.can_shift else 0

        def reuse_plan(slot: Slot) -> chunk_reuse.Plan:
            if not slot.tokens:
                return chunk_reuse.Plan(0)
            # Cells a slot shares with other sequences (n choices) lie in their common prefix.
            others = (common_prefix(s.tokens, slot.tokens) for s in self._slots if s is not slot)
            return chunk_reuse.plan(
                slot.tokens,
                prompt,
                min_chunk=min_chunk,
                limit=limit,
                max_gap=budget,
                movable_from=max(others, default=0),
            )

        # The most reused tokens; among equals the slot idle longest, so recent caches survive.
        # A slot holding the whole prompt in place (but for a token evaluated to start the choices)
        # cannot be beaten, so the others' chunk plans are not worked out: an editor sending a
        # prompt again (a repeated keystroke, a prompt cycled through the slots) waits for none.
        whole = [s for s in free if limit and common_prefix(s.tokens, prompt) >= limit]
        candidates = whole or free
        plans = {s: (s.tokens, reuse_plan(s)) for s in candidates}
        primary = max(candidates, key=lambda s: (plans[s][1].reused, -s.released))
        if plans[primary][1].reused < min(limit, max(len(prompt) // 10, MIN_REUSE)):
            # Little to reuse anywhere: take an empty slot, else the one idle longest, rather
            # than overwrite a cache its own prompt may come back to (llama-server's rule too).
            primary = min(free, key=lambda s: (bool(s.tokens), s.released))
        if not cold:
            primary = self._restore_if_better(primary, free, prompt)
        held, reuse = plans[primary]
        if primary.tokens is not held:  # a saved state was restored into it
            reuse = reuse_plan(primary)
        filler = max(self._model.info.bos_id or 0, 0)
        if not self._shift_cost.pays(self._ctx, reuse, filler, self._n_batch):
            reuse = chunk_reuse.Plan(reuse.prefix)
        if self.prompt_cache.worth_saving_before_cut(primary.tokens, reuse.prefix):
            self._save(primary)  # its cache is about to be cut short
        reuse = chunk_reuse.apply(
            self._ctx, primary.seq_id, len(primary.tokens), prompt, reuse, self._n_batch
        )
        primary.tokens = prompt[: reuse.end]
        return Placement(primary, reuse.reused, reuse.end)

    def _restore_if_better(self, primary: Slot, free: list[Slot], prompt: list[int]) -> Slot:
        """A saved prompt state sharing more of ``prompt`` than any slot, restored into the free
        slot idle longest (whose own cache is saved first), else ``primary`` unchanged."""
        saved = self.prompt_cache.take(prompt, better_than=common_prefix(primary.tokens, prompt))
        if saved is None:
            return primary
        target = min(free, key=lambda s: (bool(s.tokens), s.released))
        self._drop(target)
        if not self._ctx.restore_seq(target.seq_id, saved.state):
            log.warning("could not restore a saved prompt state (%d bytes)", len(saved.state))
            self._ctx.seq_rm(target.seq_id, -1, -1)
            return primary
        target.tokens = list(saved.tokens)
        return target

    def _drop(self, slot: Slot) -> None:
        """Free a slot's KV cells, keeping its state in host RAM when it is worth it."""
        if self.prompt_cache.worth_saving(slot.tokens):
            self._save(slot)
        self._ctx.seq_rm(slot.seq_id, -1, -1)
        slot.tokens = []

    def _save(self, slot: Slot) -> None:
        """Keep the whole of a slot's cache in host RAM, unless it is held there already."""
        if not self.prompt_cache.holds(slot.tokens):
            self.prompt_cache.put(slot.tokens, self._ctx.save_seq(slot.seq_id))

    def forget_idle(self) -> None:
        """Save idle slots' caches to host RAM and free their cells; with no host-RAM cache,
        keep them, most recently used first, while their cells fit in IDLE_CELLS together.

        All sequences share one KV buffer, and attention scans every cell up to the highest one
        in use, so idle cells slow every step of every stream, even a few hundred of them, while
        a restore from host RAM is a copy of the state, and with the logits kept after a prompt
        an editor's short prompts still come back without a step (measured in
        bench/results/2026-11-22-uvloop.md and 2026-11-23-idle-cells.md).
        """
        self.note_use()  # a new prompt's cells are in, the idle ones not yet out
        idle = sorted(
            (s for s in self._slots if not s.busy and s.tokens), key=lambda s: -s.released
        )
        spare = 0 if self.prompt_cache.max_bytes > 0 else IDLE_CELLS
        for slot in idle:
            if len(slot.tokens) <= spare:
                spare -= len(slot.tokens)
            else:
                self._drop(slot)

    def note_use(self) -> None:
        """What the slots hold now may be the most since the last pack (called when a request
        has placed its prompt and when one ends)."""
        self._peak = max(self._peak, self._held())

    def spread(self) -> bool:
        """Whether cells in use may lie far above what the idle slots hold (cells freed since
        the peak leave holes below the ones kept, and llama.cpp's attention spans up to the
        highest cell in use, in every step of every stream)."""
        held = self._held()
        return self._peak - held >= max(held, PACK_SLACK)

    def note_step(self, sequences: int, cells: int) -> None:
        """A step decoded ``cells`` new cells for ``sequences`` decoding sequences."""
        if sequences > 1:
            self._interleaved += cells

    def interleaved(self) -> bool:
        """Whether packing the busy slots' cells into runs pays (see PACK_INTERLEAVED)."""
        return self._interleaved >= max(PACK_INTERLEAVED, self._held() // 8)

    def pack(self) -> None:
        """Save every slot's cache, free them all, and restore them into the lowest cells, each
        a run of its own: the busy slots first, then the idle ones most recently used first.
        Idle, this takes back what a few cells left high cost every step
        (bench/results/2026-11-23-kv-spread.md); between steps, what interleaving costs. Must run
        right after a decode: a state saved with a move pending would lose the move."""
        kept = sorted((s for s in self._slots if s.tokens), key=lambda s: (not s.busy, -s.released))
        states = [(s, self._ctx.save_seq(s.seq_id)) for s in kept]
        for s, _ in states:
            self._ctx.seq_rm(s.seq_id, -1, -1)
        for s, state in states:
            if self._ctx.restore_seq(s.seq_id, state):
                continue
            self._ctx.seq_rm(s.seq_id, -1, -1)
            s.tokens = []
            if s.busy:  # its request cannot go on without its cells
                raise RuntimeError(f"could not restore sequence {s.seq_id} while packing")
            log.warning("could not restore an idle cache while packing (%d bytes)", len(state))
        self._peak = self._held()
        self._interleaved = 0
        self.packs += 1

    def _held(self) -> int:
        return sum(len(s.tokens) for s in self._slots)
