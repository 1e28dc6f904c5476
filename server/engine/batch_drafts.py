"""Prompt-lookup speculation for sequences that decode side by side in one batch.

Each greedy sequence may put K drafted tokens into the same ``llama_decode`` that steps the
others, with logits for each; its sampler then walks those rows in order, keeping drafts while it
picks them, so every emitted token is the one a plain step would have sampled (the sampler chain
sees exactly the rows and the history it would see plainly: grammar, biases and penalties
included). Cells of rejected drafts are removed from the sequence afterwards.

How many tokens each sequence drafts is a whole-batch decision. A step over n tokens costs
``verify(n)`` single steps (measured on the loaded context: :mod:`server.engine.costmodel`); a
batch of B decoding sequences yields B tokens plainly. Drafting K more for one sequence makes
the step cost ``verify(n + K)`` and yields ``E(alpha, K) - 1`` more tokens, so K is worth it only
while the whole batch's tokens per unit of cost go up: for a lone stream that is the simple
engine's rule, and when eight streams already fill the batch a drafted token mostly costs what
it saves, and is then left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from server.engine.costmodel import AdaptiveK, CostModel
from server.engine.drafters import PromptLookup, match_bucket

_PLAN_ROUNDS = 3  # plans made while the draft passes' sharing they assume and give differ


@dataclass
class SequenceDrafts:
    """One sequence's drafter: an n-gram index over its prompt and output, and the acceptance
    rates of its proposals (per match length: a long match is usually a copy)."""

    rates: AdaptiveK
    k_max: int
    lookup: PromptLookup = field(default_factory=PromptLookup)
    _found: tuple[int, int] | None = None
    _drafted: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, cost: CostModel, k_max: int, prompt: Sequence[int]) -> SequenceDrafts:
        drafts = cls(AdaptiveK(cost, PromptLookup.prior), k_max)
        drafts.lookup.begin(prompt)
        return drafts

    def candidate(self) -> Proposal | None:
        """What lookup would propose next (free to draft), or None: nothing to copy."""
        self._found = self.lookup.lookup()
        self._drafted = []
        if self._found is None:
            return None
        return Proposal(self.rates.rate(match_bucket(self._found[1])))

    def propose(self, k: int) -> list[int]:
        """The next k tokens of the copy found by :meth:`candidate` (fewer near the end)."""
        assert self._found is not None
        self._drafted = self.lookup.propose(self._found, k) if k > 0 else []
        return self._drafted

    def settle(self, emitted: Sequence[int]) -> None:
        """The tokens this pass emitted: accepted drafts, then the target's own token.

        With no drafts, lookup's first guess is scored against the plain token for free, so a
        sequence that turns copyable starts drafting without having to pay for a probe."""
        found = self._found
        if found is not None and emitted:
            key = match_bucket(found[1])
            if self._drafted:
                accepted = len(emitted) - 1
                self.rates.observe(key, len(self._drafted), min(accepted, len(self._drafted)))
                self.lookup.follow(found, accepted)
            else:
                guess = self.lookup.propose(found, 1)
                self.rates.observe(key, 1, int(bool(guess) and guess[0] == emitted[0]))
                self.lookup.follow(found, 0)
        self._found, self._drafted = None, []
        self.extend(emitted)

    def extend(self, tokens: Iterable[int]) -> None:
        self.lookup.extend(tokens)


@dataclass(frozen=True)
class Proposal:
    """What a sequence's drafter offers this step."""

    alpha: float  # expected acceptance rate of each drafted token
    model: bool = False  # proposed by the draft model (prompt lookup: copied, free)
    probe: int = 0  # a K to try whatever the plan says (a draft model checking it still loses)


@dataclass(frozen=True)
class Candidate:
    alpha: float  # expected acceptance rate of each drafted token
    room: int  # most tokens it may draft (its K limit, completion budget, context, batch)
    model: bool = False  # proposed by the draft model, in passes shared with the others
    probe: int = 0  # K to draft regardless of the plan (within room and budget)


def plan_drafts(
    cost: CostModel, tokens: int, decoding: int, candidates: list[Candidate], budget: int
) -> list[int]:
    """K per candidate for a step that already holds ``tokens`` tokens, ``decoding`` of which
    each yield one output token, with room for ``budget`` more: the K that raise the batch's
    expected output tokens per unit of cost.

    Candidates most likely to be right are placed first, each given the K that helps the batch
    most after those placed before it (greedy; for a lone sequence it is the best K); a probe
    drafts its K. The draft model proposes the j-th token of every sequence drafting that far in
    one pass (``cost.draft_pass``), so each of those tokens costs its share of that pass. Shares
    depend on who drafts: the plan is made assuming every draft-model candidate drafts, then
    made again with the sharing it gave, until the two agree (a few rounds at most).
    """
    models = sum(c.model for c in candidates)
    room = max((c.room for c in candidates if c.model), default=0)
    sharing = [models] * room  # draft-model sequences assumed to share each depth's pass
    ks: list[int] = []
    for _ in range(_PLAN_ROUNDS if models else 1):
        share = [cost.draft_pass(m) / m for m in sharing]
        ks = _place(cost, tokens, decoding, candidates, budget, share)
        depth = [0] * room
        for c, k in zip(candidates, ks, strict=True):
            for j in range(k if c.model else 0):
                depth[j] += 1
        seen = [max(d, 1) for d in depth]
        if seen == sharing or not any(depth):  # fewer sharers would not make anyone draft
            break
        sharing = seen
    return ks


def _place(
    cost: CostModel,
    tokens: int,
    decoding: int,
    candidates: list[Candidate],
    budget: int,
    share: list[float],
) -> list[int]:
    """The greedy placement, a draft-model token at depth j costing ``share[j]`` steps."""
    ks = [0] * len(candidates)
    n, expected, drafting = tokens, float(decoding), 0.0
    for i in sorted(range(len(candidates)), key=lambda i: -candidates[i].alpha):
        c = candidates[i]
        most = min(c.room, budget)
        best_k, best_rate, best_cost = 0, expected / (cost.verify_cost(n) + drafting), 0.0
        extra = 0.0  # what drafting k tokens costs in draft passes
        for k in range(1, most + 1):
            if c.model:
                extra += share[k - 1]
            if c.probe:
                if k == min(c.probe, most):
                    best_k, best_cost = k, extra
                    break
                continue
            gain = cost.expected_tokens(c.alpha, k) - 1.0
            rate = (expected + gain) / (cost.verify_cost(n + k) + drafting + extra)
            if rate > best_rate:
                best_k, best_rate, best_cost = k, rate, extra
        if best_k:
            ks[i] = best_k
            n += best_k
            budget -= best_k
            drafting += best_cost
            expected += cost.expected_tokens(c.alpha, best_k) - 1.0
    return ks
