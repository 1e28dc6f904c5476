"""How a request starts in the batched engine: its prompt placed in the slot that reuses most of
it (server.engine.slot_cache), free slots taken for its further choices, and, when the prompt is
cached whole with the logits kept after it (server.engine.prompt_logits), its first tokens
sampled at once, without a step. The queue and the decode loop are server.engine.batched.
"""

from __future__ import annotations

from server.engine.batch_choices import ChoiceTokens
from server.engine.batch_state import Group, Slot
from server.engine.binding import BatchContext
from server.engine.prompt_logits import PromptLogits
from server.engine.slot_cache import SlotCaches


class Admission:
    def __init__(
        self,
        ctx: BatchContext,
        slots: list[Slot],
        caches: SlotCaches,
        choices: ChoiceTokens,
        prompt_logits: PromptLogits,
        *,
        n_batch: int,
        prefill_chunk: int,
    ) -> None:
        self._ctx = ctx
        self._slots = slots
        self._caches = caches
        self._choices = choices
        self._prompt_logits = prompt_logits
        self._n_batch = n_batch
        self._prefill_chunk = prefill_chunk

    def free_slots(self) -> list[Slot]:
        return [s for s in self._slots if not s.busy]

    def start(self, g: Group, others_decoding: bool) -> bool:
        """Place the request's prompt and take its slots; True when its prompt was cached whole
        with the logits after it, so its first tokens are out without a step.

        If starting fails, the cells of every slot it took are dropped (they may not match
        their tokens any more) and the error is raised for the request alone."""
        try:
            return self._start(g, others_decoding)
        except Exception:
            for slot in g.slots():
                self._ctx.seq_rm(slot.seq_id, -1, -1)
                slot.tokens = []
            raise

    def _start(self, g: Group, others_decoding: bool) -> bool:
        prompt = g.req.prompt
        free = self.free_slots()
        # A seeded request starts cold for reproducible text (logits depend on how a prompt was
        # batched).
        cold = g.req.sampling.seed is not None and g.req.sampling.temperature > 0
        budget = self._prefill_chunk if others_decoding else self._n_batch
        row = None if cold else self._prompt_logits.get(prompt)
        placed = self._caches.place(
            prompt, free, cold=cold, budget=budget, logits_kept=row is not None
        )
        primary = placed.slot
        g.primary, g.cached, g.pending = primary, placed.cached, prompt[placed.end :]
        if g.req.max_tokens <= 0:
            # A warm-up (llama-server's n_predict 0): evaluate the prompt into the cache, then
            # finish every choice without sampling (see ChoiceTokens.prompt_ready).
            extra: list[Slot] = []
        else:
            # Further choices take the slots idle longest, sparing the recent caches worth keeping.
            spare = sorted((s for s in free if s is not primary), key=lambda s: s.released)
            extra = spare[: min(g.req.n, len(self._slots)) - 1]
        for slot in [primary, *extra]:
            slot.busy = True
            self._choices.new(g, slot, state="prefill")
        self._caches.forget_idle()
        if g.pending or row is None:  # the placement leaves nothing only where the row is kept
            return False
        self._choices.prompt_ready(g, row)
        return g.req.max_tokens > 0
