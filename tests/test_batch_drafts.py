"""The batched engine's speculation without a model: how K is planned across the batch, what
each sequence's drafter proposes, and how the draft model's passes are laid out (fakes for its
context). The real-model tests are in test_batched_speculation.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from server.engine.batch_draft_model import BatchDraftModel, ModelDrafts
from server.engine.batch_drafts import Candidate, SequenceDrafts, plan_drafts
from server.engine.costmodel import CostModel

# -- the whole-batch choice of K, without a model ---------------------------------------------

CHEAP = CostModel(0.01, {1: 1.0, 2: 1.05, 3: 1.1, 5: 1.2, 9: 1.5, 17: 2.2, 33: 3.6, 65: 6.5})
LINEAR = CostModel(0.01, {1: 1.0, 2: 2.0, 3: 3.0, 5: 5.0, 9: 9.0, 17: 17.0, 33: 33.0})


def test_a_lone_likely_copy_drafts_and_an_unlikely_one_does_not():
    assert plan_drafts(CHEAP, 1, 1, [Candidate(0.9, 16)], budget=511)[0] > 4
    assert plan_drafts(CHEAP, 1, 1, [Candidate(0.05, 16)], budget=511) == [0]


def test_drafts_never_pay_where_each_token_costs_a_step():
    assert plan_drafts(LINEAR, 1, 1, [Candidate(0.95, 16)], budget=511) == [0]


def test_a_full_batch_leaves_less_room_for_drafts():
    alone = plan_drafts(CHEAP, 1, 1, [Candidate(0.7, 16)], budget=511)[0]
    crowded = plan_drafts(CHEAP, 33, 33, [Candidate(0.7, 16)], budget=511)[0]
    assert crowded < alone


def test_the_likeliest_copy_drafts_first_within_room_and_budget():
    ks = plan_drafts(CHEAP, 2, 2, [Candidate(0.3, 16), Candidate(0.95, 16)], budget=5)
    assert ks[1] > 0 and sum(ks) <= 5
    assert plan_drafts(CHEAP, 1, 1, [Candidate(0.99, 3)], budget=511) == [3]
    assert plan_drafts(CHEAP, 1, 1, [Candidate(0.99, 0)], budget=511) == [0]


def drafting(cost: float, passes: dict[int, float] | None = None) -> CostModel:
    """CHEAP's verify costs with a draft model: ``cost`` steps a pass for one sequence."""
    return CostModel(0.01, CHEAP.verify, draft=cost, draft_passes=passes or {})


def test_a_draft_models_cost_shortens_k_and_a_probe_drafts_its_own():
    free = plan_drafts(CHEAP, 1, 1, [Candidate(0.8, 16)], budget=511)[0]
    paid = plan_drafts(drafting(0.3), 1, 1, [Candidate(0.8, 16, model=True)], budget=511)[0]
    assert 0 < paid < free
    dear = drafting(2.0)
    assert plan_drafts(dear, 1, 1, [Candidate(0.8, 16, model=True)], budget=511) == [0]
    probe = Candidate(0.1, 16, model=True, probe=2)
    assert plan_drafts(dear, 1, 1, [probe], budget=511) == [2]
    assert plan_drafts(dear, 1, 1, [Candidate(0.1, 1, model=True, probe=2)], budget=511) == [1]


def test_sequences_drafting_together_share_the_draft_models_passes():
    """Where a draft pass for eight sequences costs what one does (a GPU), eight streams draft
    together, as a lone stream does, where none would paying a pass each."""
    flat = {1: 1.0, 2: 1.01, 3: 1.02, 5: 1.03, 9: 1.05, 17: 1.1, 33: 1.2, 65: 1.4}
    shared = CostModel(0.01, flat, draft=0.3, draft_passes={1: 0.3, 2: 0.3, 5: 0.31, 8: 0.32})
    separate = CostModel(0.01, flat, draft=0.3)
    eight = [Candidate(0.7, 8, model=True) for _ in range(8)]
    alone = plan_drafts(shared, 1, 1, eight[:1], budget=511)[0]
    assert alone == plan_drafts(separate, 1, 1, eight[:1], budget=511)[0] > 0
    assert plan_drafts(separate, 8, 8, eight, budget=511) == [0] * 8
    together = plan_drafts(shared, 8, 8, eight, budget=511)
    assert min(together) > 0
    assert separate.draft_pass(8) == pytest.approx(2.4)


def test_a_plan_charges_the_sharing_it_gives_not_the_one_it_assumed():
    """Two draft-model candidates, one far less likely to be right: planned as if both drafted
    (half a pass each), the likely one drafts; the other does not, so the likely one is charged
    the whole pass, as when it drafts alone."""
    flat = {1: 1.0, 2: 1.01, 3: 1.02, 5: 1.03, 9: 1.05, 17: 1.1, 33: 1.2, 65: 1.4}
    cost = CostModel(0.01, flat, draft=0.3, draft_passes={1: 0.3, 2: 0.31})
    likely, unlikely = Candidate(0.7, 8, model=True), Candidate(0.01, 8, model=True)
    ks = plan_drafts(cost, 2, 2, [likely, unlikely], budget=511)
    assert ks[1] == 0
    assert ks[0] == plan_drafts(cost, 2, 2, [likely, Candidate(0.01, 8)], budget=511)[0] > 0


def test_draft_passes_are_shared_only_among_draft_model_sequences():
    """A prompt-lookup copy costs no pass, and does not make a draft model's proposals cheaper."""
    cost = drafting(1.5, {1: 1.5, 2: 1.6})
    copy, model = Candidate(0.8, 16), Candidate(0.8, 16, model=True)
    ks = plan_drafts(cost, 2, 2, [copy, model], budget=511)
    assert ks[0] > 0 and ks[1] == 0


class FakeDraftModel:
    """Proposes the next tokens of a fixed text, recording what it was asked."""

    def __init__(self, text: list[int]) -> None:
        self.text, self.asked = text, []

    def propose(self, jobs: list[tuple[int, list[int], int]]) -> list[list[int]]:
        self.asked.extend((seq, list(history), k) for seq, history, k in jobs)
        return [self.text[len(history) : len(history) + k] for _, history, k in jobs]


def test_model_drafts_follow_the_text_back_off_and_probe():
    fake = FakeDraftModel([7] * 200)  # always wrong: the text below counts up
    seq = ModelDrafts.start(fake, 3, drafting(0.3), 8, [0, 1, 2])  # type: ignore[arg-type]
    got = seq.candidate()
    assert got is not None and got.probe == 0 and got.model  # the prior says it pays
    kinds = []
    for _ in range(60):
        got = seq.candidate()
        if got is None:
            kinds.append("plain")
            seq.settle([len(seq.history)])
            continue
        kinds.append("probe" if got.probe else "planned")
        (asked,) = fake.propose([seq.job(got.probe or 4)])
        assert seq.proposed(asked) == [7] * (got.probe or 4)
        seq.settle([len(seq.history)])  # every draft rejected: the target's own token only
    assert "plain" in kinds and "probe" in kinds  # backed off, then probed now and then
    assert kinds[-20:].count("plain") > 15  # probes back off while they keep failing
    assert all(s == 3 for s, _, _ in fake.asked)
    assert seq.history == list(range(len(seq.history)))  # prompt, then every emitted token
    assert fake.asked[-1][1] == seq.history[: len(fake.asked[-1][1])]


class CountingContext:
    """A draft context whose next token is always the last one evaluated plus one."""

    scratch_seq = 8

    def __init__(self, threads: int = 2) -> None:
        self.passes: list[list[tuple[int, int, int, bool]]] = []
        self.removed: list[tuple[int, int]] = []
        self.threads = (threads, threads)
        self.small_step = 1

    def set_threads(self, threads: tuple[int, int], small_step: int) -> None:
        self.threads, self.small_step = threads, small_step

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        self.passes.append(list(entries))

    def logits(self, row: int, n_vocab: int) -> np.ndarray:
        out = np.zeros(n_vocab, dtype=np.float32)
        out[(self.passes[-1][row][0] + 1) % n_vocab] = 1.0
        return out

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        self.removed.append((seq, p0))


def counting_draft(n_batch: int = 512, threads: int = 2) -> tuple[BatchDraftModel, CountingContext]:
    ctx = CountingContext(threads)
    model = SimpleNamespace(n_vocab=1000)
    return BatchDraftModel(model, ctx, n_seq=8, n_batch=n_batch), ctx  # type: ignore[arg-type]


def test_sequences_draft_together_one_pass_per_token():
    draft, ctx = counting_draft()
    jobs = [(0, [10, 11, 12], 4), (3, [50, 51], 2), (5, [90], 1)]
    assert draft.propose(jobs) == [[13, 14, 15, 16], [52, 53], [91]]
    catch_up, *steps = ctx.passes
    assert catch_up == [
        (10, 0, 0, False), (11, 1, 0, False), (12, 2, 0, True),
        (50, 0, 3, False), (51, 1, 3, True),
        (90, 0, 5, True),
    ]  # fmt: skip
    # Then one pass per further token, for every sequence still drafting.
    assert steps == [[(13, 3, 0, True), (52, 2, 3, True)], [(14, 4, 0, True)], [(15, 5, 0, True)]]
    # Sequence 0 kept 12 and 13 and rejected the rest: it evaluates only what it lacks.
    ctx.passes.clear()
    assert draft.propose([(0, [10, 11, 12, 13, 40], 2)]) == [[41, 42]]
    assert ctx.removed == [(0, 4)]  # its cells of 14 and 15 dropped
    assert ctx.passes == [[(40, 4, 0, True)], [(41, 5, 0, True)]]


def test_the_draft_follows_the_targets_threads_up_to_its_own():
    draft, ctx = counting_draft()
    draft.fit_threads((1, 2), 32)  # a busy machine: the target's steps run on one thread
    assert ctx.threads == (1, 2) and ctx.small_step == 32
    one, ctx = counting_draft(threads=1)  # a draft configured with one thread keeps one
    one.fit_threads((2, 2), 32)
    assert ctx.threads == (1, 1)


def test_calibration_times_a_draft_pass_for_each_number_of_sequences():
    draft, _ = counting_draft()
    measured = dict.fromkeys(draft.timed_work(n_seq=5), 0.1)
    assert BatchDraftModel.pass_costs(measured) == {1: 0.1, 2: 0.1, 3: 0.1, 5: 0.1}
    assert "draft_batch" in measured


def test_a_long_catch_up_is_split_into_batches():
    draft, ctx = counting_draft(n_batch=4)
    assert draft.propose([(1, list(range(100, 106)), 2), (2, [7, 8, 9], 1)]) == [[106, 107], [10]]
    assert [len(p) for p in ctx.passes] == [4, 4, 1, 1]  # 6 + 3 tokens caught up, then one
    assert ctx.passes[1][1] == (105, 5, 1, True) and ctx.passes[1][3] == (8, 1, 2, False)


def test_sequence_drafts_copy_and_learn_from_what_was_kept():
    seq = SequenceDrafts.start(CHEAP, 8, [1, 2, 3, 4, 5, 6, 1, 2])
    proposal = seq.candidate()
    assert proposal is not None and not proposal.model  # copying costs no model pass
    assert seq.propose(3) == [3, 4, 5]  # what followed "1 2" before
    seq.settle([3, 4, 9])  # two drafts kept, then the target's own token
    rate = seq.rates.rate(2)
    assert rate > proposal.alpha
    assert seq.lookup.propose((0, 0), 12)[-3:] == [3, 4, 9]  # the index follows the output
    assert seq.candidate() is None  # "9" never occurred before: nothing to copy
    seq.settle([1])
    assert seq.candidate() is not None  # "1" did, followed by 2 both times
    buckets = (1, 2, 4, 8, 16)
    before = [seq.rates.rate(b) for b in buckets]
    seq.settle([2])  # nothing drafted, but lookup's guess (2) is scored for free
    after = [seq.rates.rate(b) for b in buckets]
    assert any(a > b for a, b in zip(after, before, strict=True))
