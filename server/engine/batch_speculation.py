"""The batched engine's speculation: which requests draft, the cost model of this context, and
the drafted tokens each step adds to the batch (see :mod:`server.engine.batch_drafts`; a draft
model's proposals: :mod:`server.engine.batch_draft_model`)."""

from __future__ import annotations

import logging
from collections import deque

from server.engine.base import GenerationRequest
from server.engine.batch_draft_model import BatchDraftModel, ModelDrafts
from server.engine.batch_drafts import Candidate, SequenceDrafts, plan_drafts
from server.engine.batch_state import Choice, Slot
from server.engine.binding import BatchContext
from server.engine.costmodel import CostModel, calibrate, never_cheaper, refit
from server.engine.model import Model
from server.errors import InvalidRequest

log = logging.getLogger(__name__)

# Batch sizes timed for the cost model; larger ones are extrapolated from the last two.
_SIZES = (1, 2, 3, 5, 9, 17, 33, 65)
_REFIT_EVERY = 64  # steps observed between refits of the cost model
_RECENT = 32  # step times kept per batch size: what steps cost now (threads and load change)

Entry = tuple[int, int, int, bool]  # token, position, sequence, wants logits


class BatchSpeculation:
    def __init__(
        self,
        model: Model,
        ctx: BatchContext,
        n_batch: int,
        draft: BatchDraftModel | None = None,
    ):
        self.model = model
        self._ctx = ctx
        self._n_batch = n_batch
        self.draft = draft
        self.cost: CostModel | None = None  # measured at the first speculative request
        self._steps: dict[int, deque[float]] = {}
        self._observed = 0

    def limit(self, req: GenerationRequest) -> int:
        """Most tokens a request's sequences may draft per step (0: it decodes plainly).

        Only greedy output is verified: a sampled token rarely equals a draft, and a seeded
        request promises the text of plain sampling. Grammars, biases and penalties are fine:
        the sampler walks the verify rows as it would walk plain steps."""
        cfg = self.model.cfg
        mode = self._mode(req)
        if mode == "off" or req.sampling.temperature != 0 or req.max_tokens <= 1:
            return 0
        return req.speculation.max_draft or cfg.draft_max

    def _mode(self, req: GenerationRequest) -> str:
        mode = req.speculation.mode or self.model.cfg.speculative_mode
        if mode == "draft" and self.draft is None:
            raise InvalidRequest(
                f"model {self.model.cfg.name!r} has no draft model, so it cannot decode with "
                'speculative = "draft"; name one in models.toml (draft = "NAME") or use '
                '"prompt_lookup"',
                param="speculative",
            )
        return mode

    def start(self, choice: Choice) -> None:
        """Give a new choice its drafter when its request speculates."""
        req = choice.group.req
        k_max = self.limit(req)
        if k_max and self._calibrated(choice.slot):
            assert self.cost is not None
            if self._mode(req) == "draft":
                assert self.draft is not None
                seq = choice.slot.seq_id
                choice.drafts = ModelDrafts.start(
                    self.draft,
                    seq,
                    self.cost,
                    k_max,
                    req.prompt,
                    adaptive=self.model.cfg.draft_adaptive,
                )
            else:
                choice.drafts = SequenceDrafts.start(self.cost, k_max, req.prompt)

    def _calibrated(self, slot: Slot) -> bool:
        """Measure once what a step over n tokens costs, in ``slot``'s sequence past its cached
        tokens (which stay as they are); False while there is no room there to do it."""
        if self.cost is not None:
            return True
        sizes = tuple(n for n in _SIZES if n <= self._n_batch)
        base = len(slot.tokens)
        if base + sizes[-1] >= self.model.cfg.n_ctx:
            return False
        filler = max(self.model.info.bos_id or 0, 0)

        def decode(n: int) -> None:
            self._ctx.decode([(filler, base + i, slot.seq_id, True) for i in range(n)])
            self._ctx.seq_rm(slot.seq_id, base, -1)

        n_seq = self._ctx.scratch_seq  # the slots: sequences that may draft together
        extra = self.draft.timed_work(n_seq) if self.draft is not None else {}
        step, verify, drafts = calibrate(decode, sizes, extra=extra)
        passes = BatchDraftModel.pass_costs(drafts)
        self.cost = CostModel(
            step,
            verify,
            draft=passes.get(1, 0.0),
            draft_batch=drafts.get("draft_batch", 0.0),
            draft_passes=never_cheaper(passes) if passes else {},
        )
        log.info("%s: speculation cost model: %s", self.model.cfg.name, self.cost.describe())
        return True

    def observe(self, n: int, seconds: float) -> None:
        """A step over ``n`` tokens took ``seconds``: every 64 steps the cost model is refit to
        the recent ones (``costmodel.refit``), so K follows what steps cost now."""
        if self.cost is None or n > _SIZES[-1]:
            return
        self._steps.setdefault(n, deque(maxlen=_RECENT)).append(seconds)
        self._observed += 1
        if self._observed % _REFIT_EVERY == 0:
            self.cost = refit(self.cost, self._steps)

    def add_drafts(
        self, decoding: list[Choice], entries: list[Entry], prefill: int
    ) -> dict[Choice, list[int]]:
        """Drafts for the speculating sequences among ``decoding`` (whose pending tokens are in
        ``entries``, with ``prefill`` prompt tokens to follow), appended to ``entries`` one
        choice after another; the drafts of each choice that got any."""
        drafting = [c for c in decoding if c.drafts is not None]
        if not drafting or self.cost is None:
            return {}
        n_ctx = self.model.cfg.n_ctx
        candidates = []
        for c in drafting:
            assert c.drafts is not None
            got = c.drafts.candidate()
            room = min(
                c.drafts.k_max,
                c.group.req.max_tokens - c.completion - 1,
                n_ctx - len(c.slot.tokens) - 2,
            )
            if got is None:
                candidates.append(Candidate(0.0, 0))
            else:
                candidates.append(Candidate(got.alpha, room, got.model, got.probe))
        budget = self._n_batch - len(entries)
        if self.model.cfg.draft_adaptive:
            ks = plan_drafts(self.cost, len(entries) + prefill, len(decoding), candidates, budget)
        else:  # a fixed K: every sequence drafts as much as it may
            ks = []
            for cand in candidates:
                ks.append(max(0, min(cand.room, budget)))
                budget -= ks[-1]
        out: dict[Choice, list[int]] = {}
        for c, drafts in self._propose(drafting, ks).items():
            if not drafts:
                continue
            pos = len(c.slot.tokens) + 1  # the pending token c.last goes at len(tokens)
            entries.extend((t, pos + i, c.slot.seq_id, True) for i, t in enumerate(drafts))
            out[c] = drafts
        return out

    def _propose(self, drafting: list[Choice], ks: list[int]) -> dict[Choice, list[int]]:
        """Each choice's k drafts, in ``drafting``'s order: prompt lookup's copied, the draft
        model's in passes shared by all the choices it drafts for."""
        out: dict[Choice, list[int]] = {}
        together: list[tuple[Choice, ModelDrafts, int]] = []
        for c, k in zip(drafting, ks, strict=True):
            if k == 0:
                continue
            if isinstance(c.drafts, ModelDrafts):
                together.append((c, c.drafts, k))
                out[c] = []  # filled below; keeps the order
            elif c.drafts is not None:
                out[c] = c.drafts.propose(k)
        if together:
            assert self.draft is not None
            answers = self.draft.propose([d.job(k) for _, d, k in together])
            for (c, d, _), tokens in zip(together, answers, strict=True):
                out[c] = d.proposed(tokens)
        return out
