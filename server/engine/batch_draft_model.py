"""A draft model inside the batched engine: its own multi-sequence context, one sequence per slot.

Draft sequence ``i`` follows the text that slot ``i`` of the target holds, lazily: before it
proposes, it keeps the longest prefix it shares with the request's verified text (its prompt, what
was emitted, and the token the target evaluates next), evaluates the rest in one batch, then
decodes greedily, one token a pass. Rejected proposals need no undo: the next proposal's common
prefix drops them. A slot reused for a prompt sharing a prefix reuses the draft's cells too.

Each sequence drafts in its own passes (they are not batched across sequences), which is what
the cost model charges: ``draft`` target steps per proposed token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.base import ggml_kv_type
from server.engine.batch_drafts import Proposal
from server.engine.binding import BatchContext
from server.engine.costmodel import AdaptiveK, CostModel
from server.engine.drafters import DraftModel, refuse_other_vocabulary
from server.engine.model import Model
from server.engine.sampling import common_prefix

KEY = "draft"  # one acceptance rate per sequence: a draft model's confidence is not bucketed


class BatchDraftModel:
    def __init__(self, model: Model, ctx: BatchContext, n_seq: int, n_batch: int):
        self.model = model
        self._ctx = ctx
        self._n_batch = n_batch
        self._held: list[list[int]] = [[] for _ in range(n_seq)]  # what each sequence's cells hold
        self._n_vocab = model.n_vocab

    @classmethod
    def load(
        cls, target: Model, draft: Model, *, n_seq: int, n_batch: int, threads: int
    ) -> BatchDraftModel:
        """The draft's context beside the target's (as many cells per sequence); ValueError when
        llama.cpp cannot create it, ModelUnavailable when the draft's tokens mean something else
        than the target's."""
        refuse_other_vocabulary(target.cfg.name, target.vocab, draft.cfg.name, draft.vocab)
        ctx = BatchContext(
            draft.weights,
            n_ctx=target.cfg.n_ctx * n_seq,
            n_seq=n_seq,
            n_batch=n_batch,
            threads=threads,
            kv_type=ggml_kv_type(draft.cfg.kv_cache),
            flash_attn=draft.cfg.flash_attn,
        )
        return cls(draft, ctx, n_seq, n_batch)

    def propose(self, seq: int, history: Sequence[int], k: int) -> list[int]:
        """k greedy tokens after ``history`` (the verified text, the pending token last)."""
        held = self._held[seq]
        limit = min(len(held), len(history) - 1)  # history's last token is evaluated for logits
        # Mostly the whole of it (the verified text grew by what was accepted): compared in C.
        n = limit if held[:limit] == list(history[:limit]) else common_prefix(held, history)
        n = min(n, limit)
        if n < len(held):
            self._ctx.seq_rm(seq, n, -1)
            del held[n:]
        for start in range(n, len(history), self._n_batch):
            chunk = history[start : start + self._n_batch]
            last = start + len(chunk) == len(history)
            self._ctx.decode(
                [(t, start + i, seq, last and i == len(chunk) - 1) for i, t in enumerate(chunk)]
            )
            held.extend(chunk)
        out: list[int] = []
        row = (len(history) - 1 - n) % self._n_batch  # history's last token in its batch
        for i in range(k):
            out.append(int(self._ctx.logits(row, self._n_vocab).argmax()))
            if i < k - 1:  # the last proposal needs no logits of its own
                self._ctx.decode([(out[-1], len(held), seq, True)])
                held.append(out[-1])
                row = 0
        return out

    def step_work(self, n: int) -> float:
        """Calibration: one pass over n tokens in the scratch sequence, then undone."""
        s = self._ctx.scratch_seq
        filler = max(self.model.info.bos_id or 0, 0)
        self._ctx.decode([(filler, i, s, i == n - 1) for i in range(n)])
        self._ctx.seq_rm(s, -1, -1)
        return float(n)

    def close(self) -> None:
        self._ctx.close()
        self.model.close()


@dataclass
class ModelDrafts:
    """One sequence's proposals from the draft model, with its acceptance rate (a probe now and
    then while drafting does not pay, as the simple engine does)."""

    draft: BatchDraftModel
    seq: int
    rates: AdaptiveK
    k_max: int
    history: list[int] = field(default_factory=list)
    adaptive: bool = True  # False: always draft (the batch's plan still bounds K)
    _probe: bool = False
    _drafted: list[int] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        draft: BatchDraftModel,
        seq: int,
        cost: CostModel,
        k_max: int,
        prompt: Sequence[int],
        *,
        adaptive: bool = True,
    ) -> ModelDrafts:
        return cls(draft, seq, AdaptiveK(cost, DraftModel.prior), k_max, list(prompt), adaptive)

    def candidate(self) -> Proposal | None:
        """What drafting now promises: the acceptance rate, and the K a probe must try (0: the
        batch's plan decides); None when it neither pays nor is due a probe."""
        self._drafted = []
        if not self.adaptive:
            return Proposal(self.rates.rate(KEY), self.rates.cost.draft)
        k, self._probe = self.rates.choose(KEY, self.k_max, probe=True)
        if k == 0:
            return None
        return Proposal(self.rates.rate(KEY), self.rates.cost.draft, k if self._probe else 0)

    def propose(self, k: int) -> list[int]:
        self._drafted = self.draft.propose(self.seq, self.history, k) if k > 0 else []
        return self._drafted

    def settle(self, emitted: Sequence[int]) -> None:
        if self._drafted and emitted:
            accepted = min(len(emitted) - 1, len(self._drafted))
            self.rates.observe(KEY, len(self._drafted), accepted, probe=self._probe)
        self._drafted, self._probe = [], False
        self.extend(emitted)

    def extend(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)
