"""Speculative decoding for greedy requests: draft K tokens, verify them in one target pass.

Each pass evaluates ``[pending token] + drafts`` in one batch with logits for exactly those K+1
rows (never ``logits_all``, which would hold n_ctx x vocab floats), accepts the longest prefix
of drafts that equals the target's argmax, and adds the target's own token where they first
differ, so every pass yields at least one token. Rejected positions are removed from the KV
cache and ``Llama.input_ids``/``n_tokens`` always describe what the cache holds, so the next
request's prefix reuse in ``Llama.generate`` keeps working.

Only greedy decoding is verified (temperature 0, no penalties): the engine sends sampled
requests down the plain path. Greedy output is token-for-token the plain output when llama.cpp
computes a row the same way alone or inside a batch. On the CPU backend (measured on SmolLM2
Q4_1) that holds with flash attention and a quantized (q8_0/q4_0) KV cache: identical logits.
It does not without flash attention (rows up to 0.99 apart), with an f16 cache (llama.cpp splits
a lone token's attention across threads once 512 cells are in use, and tiles batches of 64+
rows), or with F16 weights (batched matmuls go through other kernels); there outputs can part
where the top two tokens nearly tie (measured gaps up to 0.23 nats). The engine turns flash
attention on for models that speculate, and calibration probes and logs which case applies.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.engine import binding
from server.engine.costmodel import PLAUSIBLE_ACCEPTANCE, AdaptiveK, CostModel, calibrate
from server.engine.drafters import DraftModel, PromptLookup, match_bucket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    token: int
    logits: np.ndarray | None  # the target's row this token was chosen from (None: read it live)
    drafted: bool = False  # proposed by the drafter and accepted by the target


@dataclass
class RunStats:
    drafted: int = 0  # tokens proposed
    passes: int = 0  # target forward passes, the prompt's included (it yields the first token)
    drafts: list[int] = field(default_factory=list)  # K of each decode pass (for the cost model)
    draft_steps: int = 0  # draft-model tokens decoded alone
    draft_batched: int = 0  # ... and in batches (catching up)


@dataclass
class _Proposal:
    drafts: list[int] = field(default_factory=list)
    key: Hashable = None  # which acceptance rate the outcome updates
    probe: bool = False
    guess: int | None = None  # prompt lookup's first token when it drafts nothing
    found: tuple[int, int] | None = None  # prompt lookup's (source start, match length)


class SpeculativeDecoder:
    """Owns the speculative state of one engine: its cost model and acceptance rates."""

    def __init__(self, name: str, llm: Any, draft: DraftModel | None = None):
        self.name = name
        self.llm = llm
        self.draft = draft
        self._n_vocab = llm.n_vocab()
        self._controllers: dict[str, AdaptiveK] = {}
        self.costs: dict[str, CostModel] = {}
        self.exact: bool | None = None  # known after calibration

    # -- cost model ------------------------------------------------------------------------

    def calibrate(self) -> None:
        """Measure what a verify pass of n tokens and a draft step cost on this machine."""
        llm = self.llm
        top = min(33, llm.n_batch)
        sizes = tuple(n for n in (1, 2, 3, 5, 9, 17, 33) if n <= top)
        if llm.n_tokens + top >= llm.n_ctx():
            llm.reset()  # no room past the cached text: give up its reuse once
            binding.llama_seq_rm(llm, 0)
        base = llm.n_tokens
        filler = max(llm.token_bos(), 0)

        def decode(n: int) -> None:
            binding.llama_decode(llm, [filler] * n, base)
            binding.llama_seq_rm(llm, base)

        extra = {}
        if self.draft is not None:
            extra = {"draft": self.draft.timed_work(1), "draft_batch": self.draft.timed_work(32)}
        step, verify, drafts = calibrate(decode, sizes, extra=extra)
        ratio, batch = drafts.get("draft", 0.0), drafts.get("draft_batch", 0.0)
        self.exact = self._batch_invariant(base, filler)
        llm._requires_eval = True  # the context's logits are calibration garbage now
        lookup = self.costs["prompt_lookup"] = CostModel(step, verify, draft=0.0)
        log.info("%s: speculation cost model: %s", self.name, lookup.describe())
        if self.draft is not None:
            cost = self.costs["draft"] = CostModel(step, verify, draft=ratio, draft_batch=batch)
            alpha = cost.break_even_alpha(32)
            pays = alpha is not None and alpha <= PLAUSIBLE_ACCEPTANCE
            (log.info if pays else log.warning)(
                "%s: draft %s costs %.2f target steps a token: it pays from an acceptance rate "
                "of %s%s",
                self.name,
                self.draft.cfg.name,
                ratio,
                f"{alpha:.2f}" if alpha is not None else "never (not even at 1.0)",
                "" if pays else "; adaptive speculation will decode plainly on this machine",
            )

    def _batch_invariant(self, base: int, filler: int) -> bool:
        """Whether rows computed inside a batch equal rows computed one token at a time; only
        then is greedy speculation token-for-token plain decoding. Probed here on a few tokens;
        an f16/f32 cache is never counted as exact: llama.cpp's CPU flash attention switches
        kernels for a lone token once 512 cells are in use and for batches of 64 rows."""
        import llama_cpp

        llm = self.llm
        tokens = [filler, *(t % self._n_vocab for t in (100, 200, 300))]
        alone = []
        for i, t in enumerate(tokens):
            binding.llama_decode(llm, [t], base + i)
            alone.append(self._row(0).copy())
        binding.llama_seq_rm(llm, base)
        binding.llama_decode(llm, tokens, base)
        same = all(np.array_equal(a, self._row(i)) for i, a in enumerate(alone))
        binding.llama_seq_rm(llm, base)
        float_cache = llm.context_params.type_k in (
            llama_cpp.GGML_TYPE_F16,
            llama_cpp.GGML_TYPE_F32,
        )
        if same and not float_cache:
            log.info(
                "%s: batched rows are bit-identical to single steps: greedy speculation "
                "reproduces plain decoding token for token",
                self.name,
            )
            return True
        log.warning(
            "%s: batched rows can differ slightly from single steps (%s): greedy speculation "
            "can pick another token where the top two nearly tie; a q8_0 KV cache with flash "
            "attention makes it exact for most weight types",
            self.name,
            "f16 KV cache" if same else "measured",
        )
        return False

    def controller(self, mode: str) -> AdaptiveK:
        """Acceptance rates for a request. A draft model's are a property of the model pair and
        carry over; prompt lookup's depend on what is being written (a rewrite copies, fresh
        code does not), so each request starts from the priors and learns from its own text."""
        if not self.costs:
            self.calibrate()
        if mode == "prompt_lookup":
            return AdaptiveK(self.costs[mode], PromptLookup.prior)
        if mode not in self._controllers:
            self._controllers[mode] = AdaptiveK(self.costs[mode], DraftModel.prior)
        return self._controllers[mode]

    # -- decoding --------------------------------------------------------------------------

    def run(
        self,
        prompt: Sequence[int],
        mode: str,
        k_max: int,
        adaptive: bool,
        max_new: int,
        stats: RunStats,
    ) -> Generator[Step, None, None]:
        """Greedy tokens after ``prompt``, at most ``max_new``; stops whenever the consumer does."""
        llm = self.llm
        ctl = self.controller(mode)
        k_max = max(0, min(k_max, llm.n_batch - 1))
        try:
            row = self._prefill(prompt)
            stats.passes = 1
            last = int(row.argmax())
            history = list(prompt)
            history.append(last)
            lookup = PromptLookup() if mode == "prompt_lookup" else None
            if lookup is not None:
                lookup.begin(history)
            if self.draft is not None and mode == "draft":
                self.draft.begin()
            yield Step(last, row)
            emitted = 1
            while emitted < max_new:
                # Drafts end before the completion budget and the context do.
                room = min(k_max, max_new - emitted - 1, llm.n_ctx() - llm.n_tokens - 2)
                p = self._propose(mode, ctl, lookup, room, adaptive, history)
                stats.drafted += len(p.drafts)
                stats.drafts.append(len(p.drafts))
                out = self._verify(last, p.drafts)
                stats.passes += 1
                accepted = len(out) - 1
                if p.drafts and adaptive:  # a fixed K says nothing the controller asked
                    ctl.observe(p.key, len(p.drafts), accepted, p.probe)
                elif p.guess is not None:  # what lookup would have drafted, scored for free
                    ctl.observe(p.key, 1, int(out[0][0] == p.guess))
                if lookup is not None and p.found is not None:
                    lookup.follow(p.found, accepted)
                for i, (token, logits) in enumerate(out):
                    history.append(token)
                    emitted += 1
                    yield Step(token, logits, drafted=i < len(out) - 1)
                if lookup is not None:
                    lookup.extend(t for t, _ in out)
                last = out[-1][0]
        finally:
            # The context's logits belong to the last verify batch, not to its last kept token.
            llm._requires_eval = True
            if self.draft is not None and mode == "draft":
                stats.draft_steps, stats.draft_batched = self.draft.steps, self.draft.batched

    def _propose(
        self,
        mode: str,
        ctl: AdaptiveK,
        lookup: PromptLookup | None,
        room: int,
        adaptive: bool,
        history: list[int],
    ) -> _Proposal:
        if room <= 0:
            return _Proposal()
        if lookup is not None:
            found = lookup.lookup()
            if found is None:
                return _Proposal()
            key = match_bucket(found[1])
            k, _ = ctl.choose(key, room, probe=False) if adaptive else (room, False)
            if k == 0:
                return _Proposal(key=key, guess=lookup.propose(found, 1)[0], found=found)
            return _Proposal(lookup.propose(found, k), key, found=found)
        assert self.draft is not None
        k, probe = ctl.choose("draft", room) if adaptive else (room, False)
        if k == 0:
            return _Proposal(key="draft")
        return _Proposal(self.draft.propose(history, k), "draft", probe)

    def _prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Evaluate the prompt past its cached prefix; the logits row of its last token."""
        llm = self.llm
        cached = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], prompt, strict=False):
            if a != b:
                break
            cached += 1
        cached = min(cached, len(prompt) - 1)  # the last prompt token is evaluated for its logits
        if not binding.llama_seq_rm(llm, cached):
            cached = 0
            llm.reset()
            binding.llama_seq_rm(llm, 0)
        llm.n_tokens = cached
        llm.eval(list(prompt[cached:]))
        return self._row(-1)

    def _verify(self, last: int, drafts: list[int]) -> list[tuple[int, np.ndarray]]:
        """One target pass over [last] + drafts; the tokens it vouches for, with their rows."""
        llm = self.llm
        n_past = llm.n_tokens
        batch = [last, *drafts]
        binding.llama_decode(llm, batch, n_past)
        out: list[tuple[int, np.ndarray]] = []
        for i in range(len(batch)):
            row = self._row(i)
            token = int(row.argmax())
            out.append((token, row))
            if i >= len(drafts) or token != drafts[i]:
                break
        keep = n_past + len(out)  # [last] + the accepted drafts
        llm.input_ids[n_past:keep] = batch[: len(out)]
        llm.n_tokens = keep
        if keep < n_past + len(batch):
            binding.llama_seq_rm(llm, keep)
        return out

    def _row(self, i: int) -> np.ndarray:
        return binding.llama_logits_row(self.llm, i, self._n_vocab)

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
