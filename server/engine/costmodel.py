"""When speculation pays: the cost model, its calibration, and the adaptive draft length K.

Costs are in units of one single-token target forward pass (a "step"). With a drafter that
proposes K tokens at ``draft`` steps each, a target that verifies K+1 tokens at ``verify(K+1)``
steps, and each drafted token accepted with probability ``alpha`` (independently, until the first
rejection), one pass yields

    E(K) = (1 - alpha^(K+1)) / (1 - alpha)        tokens (the target adds one at the first miss)
    speedup(K) = E(K) / (K * draft + verify(K+1))  relative to plain decoding (K = 0: exactly 1)

A draft model also reads the prompt and every token it did not propose itself, in batches
(``draft_batch`` steps a token); that is paid once a request starts drafting, which is why a
pair is only tried where it pays at a plausible acceptance rate. Where several sequences draft
together (the batched engine), one draft pass proposes a token for each of them, at
``draft_pass(m)`` steps for m sequences.

``verify`` is measured on the loaded model (see :func:`calibrate`), because it decides
everything: on a GPU or with F16 weights a batch of 5 costs little more than one token, on a
2-core CPU with 4-bit weights it costs almost 3. K is chosen per pass to maximise the predicted
speedup from the running acceptance rate; when no K beats 1 the decoder takes plain steps. Prompt
lookup keeps scoring its first guess against each plain step (free), a draft model re-probes now
and then, backing off exponentially while probes keep failing.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

# Verify sizes K+1 measured at calibration (K = 0, 1, 2, 4, 8, 16, 32); others are interpolated.
CALIBRATION_SIZES = (1, 2, 3, 5, 9, 17, 33)
_EMA = 0.15  # weight of one accept/reject observation in the running acceptance rate
_PROBE_K = 2
# Greedy acceptance of a good draft model (llama.cpp reports 0.6-0.85 for same-family pairs;
# a Q4_0 build of SmolLM2 agrees with its Q4_1 on 81% of tokens): a pair that needs more is off.
PLAUSIBLE_ACCEPTANCE = 0.9
_PROBE_FIRST, _PROBE_MAX = 8, 128  # plain steps between probes while speculation does not pay


_TABLE = 64  # verify costs are precomputed up to this batch size (K is at most 32)


@dataclass(frozen=True)
class CostModel:
    """Measured costs, in target steps; the draft's are 0 for a drafter that runs no model."""

    step_s: float  # seconds of one single-token target pass
    verify: dict[int, float]  # batch size -> cost relative to one step (verify[1] == 1)
    draft: float = 0.0  # one draft token, decoded alone
    draft_batch: float = 0.0  # one draft token inside a batch (the draft catching up)
    # sequences m -> one draft pass proposing a token for each of m sequences (measured sizes;
    # empty: m passes of ``draft``)
    draft_passes: dict[int, float] = field(default_factory=dict)
    _table: tuple[float, ...] = field(default=(), repr=False, compare=False)
    _pass_table: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        # best_k and plan_drafts run before every pass: interpolate once, not per call.
        table = (0.0, *(_interpolate(self.verify, n) for n in range(1, _TABLE + 1)))
        object.__setattr__(self, "_table", table)
        passes = self.draft_passes or {1: self.draft}
        pass_table = (0.0, *(_interpolate(passes, m) for m in range(1, _TABLE + 1)))
        object.__setattr__(self, "_pass_table", pass_table)

    def verify_cost(self, n: int) -> float:
        return self._table[n] if n <= _TABLE else _interpolate(self.verify, n)

    def draft_pass(self, m: int) -> float:
        """One draft-model pass proposing a token for each of m sequences, in target steps."""
        if m <= _TABLE:
            return self._pass_table[m]
        return _interpolate(self.draft_passes or {1: self.draft}, m)

    def expected_tokens(self, alpha: float, k: int) -> float:
        if alpha >= 1.0 - 1e-9:
            return float(k + 1)
        return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)

    def speedup(self, alpha: float, k: int) -> float:
        if k == 0:
            return 1.0
        return self.expected_tokens(alpha, k) / (k * self.draft + self.verify_cost(k + 1))

    def break_even_alpha(self, k_max: int) -> float | None:
        """The lowest acceptance rate at which some K beats plain decoding (None: none does)."""
        for pct in range(1, 101):
            if self.best_k(pct / 100, k_max)[0] > 0:
                return pct / 100
        return None

    def best_k(self, alpha: float, k_max: int) -> tuple[int, float]:
        best, best_s = 0, 1.0
        for k in range(1, k_max + 1):
            s = self.speedup(alpha, k)
            if s > best_s:
                best, best_s = k, s
        return best, best_s

    def describe(self) -> str:
        v = " ".join(f"{n}:{c:.2f}" for n, c in sorted(self.verify.items()))
        passes = " ".join(f"{m}:{c:.2f}" for m, c in sorted(self.draft_passes.items()))
        return (
            f"step {self.step_s * 1e3:.1f} ms, verify(n)/step {v}, draft/step {self.draft:.2f} "
            f"(in a batch {self.draft_batch:.2f}"
            + (f"; a pass for m sequences {passes})" if passes else ")")
        )


def _interpolate(costs: Mapping[int, float], n: int) -> float:
    """The cost at size n from costs measured at some sizes: linear between two of them,
    beyond the largest along the last slope (through the origin from a single one)."""
    if n in costs:
        return costs[n]
    sizes = sorted(costs)
    lo = max((s for s in sizes if s < n), default=sizes[0])
    hi = min((s for s in sizes if s > n), default=None)
    if hi is None:  # beyond the largest measured size: extend its last slope
        prev = max((s for s in sizes if s < lo), default=None)
        slope = (costs[lo] - costs[prev]) / (lo - prev) if prev else costs[lo] / lo
        return costs[lo] + slope * (n - lo)
    w = (n - lo) / (hi - lo)
    return costs[lo] * (1 - w) + costs[hi] * w


def calibrate(
    decode: Callable[[int], None],
    sizes: tuple[int, ...] = CALIBRATION_SIZES,
    reps: int = 3,
    extra: dict[str, Callable[[], float]] | None = None,
) -> tuple[float, dict[int, float], dict[str, float]]:
    """Time ``decode(n)`` (one target pass over n tokens) per size, and each ``extra`` timer
    (which runs some work and returns how many tokens it was worth): (step seconds, verify cost
    per size in steps, extra cost per token in steps).

    Medians after a warm-up, timed round-robin so that load from elsewhere lands on every size
    alike instead of skewing one of them; the bench prints them next to what it measured.
    """
    extra = extra or {}
    decode(sizes[-1])  # warm-up: first use allocates the compute buffers for this batch size
    for work in extra.values():
        work()
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    extra_runs: dict[str, list[float]] = {name: [] for name in extra}
    for _ in range(reps):
        for n in sizes:
            t0 = time.perf_counter()
            decode(n)
            runs[n].append(time.perf_counter() - t0)
        for name, work in extra.items():
            t0 = time.perf_counter()
            tokens = work()
            extra_runs[name].append((time.perf_counter() - t0) / tokens)
    seconds = {n: statistics.median(r) for n, r in runs.items()}
    step = seconds[1]
    rel = never_cheaper({n: seconds[n] / step for n in sizes})
    return step, rel, {name: statistics.median(r) / step for name, r in extra_runs.items()}


def never_cheaper(rel: Mapping[int, float]) -> dict[int, float]:
    """Costs per batch size, each raised to the largest of the smaller sizes': a batch never
    costs less than a smaller one, whatever noise in the timings says. (Verify costs include
    size 1 at 1.0, so no batch costs less than a step.)"""
    out, floor = {}, 0.0
    for n in sorted(rel):
        floor = max(floor, rel[n])
        out[n] = floor
    return out


def refit(cost: CostModel, steps: Mapping[int, Sequence[float]], min_seen: int = 3) -> CostModel:
    """``cost`` brought up to the step times seen since (seconds per batch size): the one-token
    step and every size seen ``min_seen`` times at their medians, the sizes not seen at their
    calibrated ratio. A calibration is a few passes at one moment; measured here, a moment when
    the one-token step ran 30% slow made every batch look that much cheaper and K too large."""
    ones = steps.get(1, ())
    step = statistics.median(ones) if len(ones) >= min_seen else cost.step_s
    rel = dict(cost.verify)
    for n, times in steps.items():
        if n > 1 and len(times) >= min_seen:
            rel[n] = statistics.median(times) / step
    return replace(cost, step_s=step, verify=never_cheaper(rel))


@dataclass
class _KeyState:
    alpha: float
    skipped: int = 0  # plain steps since the last probe
    probe_every: int = _PROBE_FIRST


@dataclass
class AdaptiveK:
    """Chooses K per pass from acceptance rates kept per kind of proposal.

    Kinds are what the drafter knows about its confidence, e.g. how long a prompt-lookup match is;
    the rates persist across requests on the same engine, so a workload's history is the prior.
    """

    cost: CostModel
    priors: Callable[[Hashable], float]
    _keys: dict[Hashable, _KeyState] = field(default_factory=dict)
    _worth: dict[int, bool] = field(default_factory=dict)

    def rate(self, key: Hashable) -> float:
        return self._state(key).alpha

    def _state(self, key: Hashable) -> _KeyState:
        if key not in self._keys:
            self._keys[key] = _KeyState(self.priors(key))
        return self._keys[key]

    def worth_probing(self, k_max: int) -> bool:
        # Every probe makes a draft model catch up on the text it skipped, so probe only a pair
        # that pays at an acceptance rate drafts really reach.
        if k_max not in self._worth:
            alpha = self.cost.break_even_alpha(k_max)
            self._worth[k_max] = alpha is not None and alpha <= PLAUSIBLE_ACCEPTANCE
        return self._worth[k_max]

    def choose(self, key: Hashable, k_max: int, probe: bool = True) -> tuple[int, bool]:
        """(K, is_probe): K = 0 means one plain step.

        A drafter that can check its guess against the plain step for free (prompt lookup: see
        ``observe``) passes ``probe=False``; a draft model has to be run, and is re-tried now and
        then at a small K so a workload that turns copyable is noticed."""
        st = self._state(key)
        k, _ = self.cost.best_k(st.alpha, k_max)
        if k > 0:
            st.skipped = 0
            return k, False
        st.skipped += 1
        if probe and st.skipped >= st.probe_every and self.worth_probing(k_max):
            st.skipped = 0
            return min(_PROBE_K, k_max), True
        return 0, False

    def observe(self, key: Hashable, drafted: int, accepted: int, probe: bool = False) -> None:
        st = self._state(key)
        a = st.alpha
        for _ in range(accepted):
            a += _EMA * (1.0 - a)
        if accepted < drafted:  # tokens after the first rejection were never tested
            a -= _EMA * a
        st.alpha = a
        if probe:
            failed = accepted < drafted
            st.probe_every = min(st.probe_every * 2, _PROBE_MAX) if failed else _PROBE_FIRST
