"""A draft model inside the batched engine: its own multi-sequence context, one sequence per slot.

Draft sequence ``i`` follows the text that slot ``i`` of the target holds, lazily: before it
proposes, it keeps the longest prefix it shares with the request's verified text (its prompt, what
was emitted, and the token the target evaluates next), evaluates the rest, then decodes greedily,
one token a pass. Rejected proposals need no undo: the next proposal's common prefix drops them.
A slot reused for a prompt sharing a prefix reuses the draft's cells too.

The sequences drafting in a step draft together: one batch catches all of them up, then each
pass proposes the next token of every sequence still drafting, as the target steps its
sequences (``CostModel.draft_pass``: a pass for eight costs far less than eight passes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from server.engine.base import ggml_kv_type
from server.engine.batch_drafts import Proposal
from server.engine.binding import BatchContext
from server.engine.costmodel import AdaptiveK, CostModel
from server.engine.drafters import DraftModel, refuse_other_vocabulary
from server.engine.model import Model
from server.engine.sampling import common_prefix

KEY = "draft"  # one acceptance rate per sequence: a draft model's confidence is not bucketed
PASS_SIZES = (1, 2, 3, 5, 8)  # sequences per draft pass timed for the cost model
_PASS = "pass"  # calibration names: "pass3" is a draft pass for 3 sequences
Entry = tuple[int, int, int, bool]  # token, position, sequence, wants logits


class BatchDraftModel:
    def __init__(self, model: Model, ctx: BatchContext, n_seq: int, n_batch: int):
        self.model = model
        self._ctx = ctx
        self._n_batch = n_batch
        self._held: list[list[int]] = [[] for _ in range(n_seq)]  # what each sequence's cells hold
        self._n_vocab = model.n_vocab
        self._configured = ctx.threads[0]

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

    def fit_threads(self, threads: tuple[int, int], small_step: int) -> None:
        """The target's thread counts under the current load (``cpu_share``), never more than
        the draft was loaded with."""
        most = self._configured
        self._ctx.set_threads((min(threads[0], most), min(threads[1], most)), small_step)

    def propose(self, jobs: Sequence[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """k greedy tokens after ``history`` (the verified text, the pending token last) for each
        (sequence, history, k), all sequences in the same passes."""
        catch_up: list[Entry] = []
        last: dict[int, int] = {}  # job -> index in catch_up of its history's last token
        for j, (seq, history, _) in enumerate(jobs):
            held = self._held[seq]
            limit = min(len(held), len(history) - 1)  # history's last token is evaluated for logits
            # Mostly the whole of it (the verified text grew by what was accepted): compared in C.
            n = limit if held[:limit] == list(history[:limit]) else common_prefix(held, history)
            n = min(n, limit)
            if n < len(held):
                self._ctx.seq_rm(seq, n, -1)
                del held[n:]
            catch_up.extend((t, n + i, seq, False) for i, t in enumerate(history[n:]))
            held.extend(history[n:])
            last[j] = len(catch_up) - 1
            tok, pos, _, _ = catch_up[-1]
            catch_up[-1] = (tok, pos, seq, True)
        out: list[list[int]] = [[] for _ in jobs]
        rows = {i: j for j, i in last.items()}
        for start in range(0, len(catch_up), self._n_batch):
            self._ctx.decode(catch_up[start : start + self._n_batch])
            for i in range(start, min(start + self._n_batch, len(catch_up))):
                if i in rows:
                    out[rows[i]].append(self._argmax(i - start))
        for depth in range(1, max((k for _, _, k in jobs), default=0)):
            going = [j for j, (_, _, k) in enumerate(jobs) if k > depth]
            passes: list[Entry] = []
            for j in going:
                seq = jobs[j][0]
                passes.append((out[j][-1], len(self._held[seq]), seq, True))
                self._held[seq].append(out[j][-1])
            self._ctx.decode(passes)
            for row, j in enumerate(going):
                out[j].append(self._argmax(row))
        return out

    def _argmax(self, row: int) -> int:
        return int(self._ctx.logits(row, self._n_vocab).argmax())

    def timed_work(self, n_seq: int) -> dict[str, Callable[[], float]]:
        """Calibration work for ``costmodel.calibrate``: a pass proposing for m sequences (per
        pass), and the draft catching up inside a 32-token batch (per token)."""
        work: dict[str, Callable[[], float]] = {
            f"{_PASS}{m}": partial(self._scratch_pass, m, 1.0) for m in PASS_SIZES if m <= n_seq
        }
        work["draft_batch"] = partial(self._scratch_pass, 32, 32.0)
        return work

    @staticmethod
    def pass_costs(measured: Mapping[str, float]) -> dict[int, float]:
        """:meth:`timed_work`'s passes as ``CostModel.draft_passes`` (sequences -> steps)."""
        return {
            int(name.removeprefix(_PASS)): cost
            for name, cost in measured.items()
            if name.startswith(_PASS)
        }

    def _scratch_pass(self, n: int, worth: float) -> float:
        """One pass over n tokens in the scratch sequence, then undone; returns ``worth``."""
        s = self._ctx.scratch_seq
        filler = max(self.model.info.bos_id or 0, 0)
        self._ctx.decode([(filler, i, s, i == n - 1) for i in range(n)])
        self._ctx.seq_rm(s, -1, -1)
        return worth

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
            return Proposal(self.rates.rate(KEY), model=True)
        k, self._probe = self.rates.choose(KEY, self.k_max, probe=True)
        if k == 0:
            return None
        return Proposal(self.rates.rate(KEY), model=True, probe=k if self._probe else 0)

    def job(self, k: int) -> tuple[int, Sequence[int], int]:
        """What to ask the draft model for k proposals (``BatchDraftModel.propose``)."""
        return self.seq, self.history, k

    def proposed(self, tokens: list[int]) -> list[int]:
        """The draft model's answer to :meth:`job`, kept to be settled."""
        self._drafted = tokens
        return tokens

    def settle(self, emitted: Sequence[int]) -> None:
        if self._drafted and emitted:
            accepted = min(len(emitted) - 1, len(self._drafted))
            self.rates.observe(KEY, len(self._drafted), accepted, probe=self._probe)
        self._drafted, self._probe = [], False
        self.extend(emitted)

    def extend(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)
