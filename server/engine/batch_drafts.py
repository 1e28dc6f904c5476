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
    draft: float = 0.0  # what proposing one token costs, in target steps (prompt lookup: 0)
    probe: int = 0  # a K to try whatever the plan says (a draft model checking it still loses)


@dataclass(frozen=True)
class Candidate:
    alpha: float  # expected acceptance rate of each drafted token
    room: int  # most tokens it may draft (its K limit, completion budget, context, batch)
    draft: float = 0.0  # cost of proposing one token, in target steps
    probe: int = 0  # K to draft regardless of the plan (within room and budget)


def plan_drafts(
    cost: CostModel, tokens: int, decoding: int, candidates: list[Candidate], budget: int
) -> list[int]:
    """K per candidate for a step that already holds ``tokens`` tokens, ``decoding`` of which
    each yield one output token, with room for ``budget`` more: the K that raise the batch's
    expected output tokens per unit of cost.

    Candidates most likely to be right are placed first, each given the K that helps the batch
    most after those placed before it (greedy; for a lone sequence it is the best K). A draft
    model's proposals cost ``draft`` steps each on top of the step; a probe drafts its K."""
    ks = [0] * len(candidates)
    n, expected, drafting = tokens, float(decoding), 0.0
    for i in sorted(range(len(candidates)), key=lambda i: -candidates[i].alpha):
        c = candidates[i]
        most = min(c.room, budget)
        best_k, best_rate = 0, expected / (cost.verify_cost(n) + drafting)
        if c.probe:
            best_k = min(c.probe, most)
        else:
            for k in range(1, most + 1):
                gain = cost.expected_tokens(c.alpha, k) - 1.0
                rate = (expected + gain) / (cost.verify_cost(n + k) + drafting + k * c.draft)
                if rate > best_rate:
                    best_k, best_rate = k, rate
        if best_k:
            ks[i] = best_k
            n += best_k
            budget -= best_k
            drafting += best_k * c.draft
            expected += cost.expected_tokens(c.alpha, best_k) - 1.0
    return ks
