"""What the batched engine does with one choice's rows of logits once a step has computed them.

A choice's token comes from its logits row (numpy's argmax when greedy with at most bans, else
its llama.cpp sampler chain); drafted rows are walked while the pick agrees; text is released
past stop strings and emitted; a choice finishes on an end token, a stop string, its budget or
cancellation, and its slot then starts the request's next choice when a request asks for more
choices than slots. A request's choices start together once its prompt is in and end together
when it is over. The step and admission loop around it is server.engine.batched.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from server.engine.base import Delta, Finished, FinishReason, Timings, TokenLogprob
from server.engine.batch_speculation import BatchSpeculation
from server.engine.batch_state import Choice, Group, Slot
from server.engine.binding import BatchContext
from server.engine.frames import Frames
from server.engine.model import Model
from server.engine.prompt_logits import PromptLogits
from server.engine.sampling import (
    greedy_bans,
    greedy_pick,
    logprob_entry,
    sample_row,
    sampler_chain,
)
from server.engine.text import TextReleaser

# Where a choice's next token comes from: a row of the last step's logits, or a row kept apart
# (the logits after a prompt evaluated earlier: server.engine.prompt_logits).
At = int | np.ndarray


class ChoiceTokens:
    def __init__(
        self,
        ctx: BatchContext,
        model: Model,
        speculation: BatchSpeculation,
        prompt_logits: PromptLogits,
        frame_s: float = 0.0,
    ) -> None:
        import llama_cpp

        self._lib: Any = llama_cpp
        self._ctx = ctx
        self.model = model
        self._n_vocab = model.n_vocab
        self._speculation = speculation
        self._prompt_logits = prompt_logits
        self._frame_s = frame_s  # server.engine.frames

    def new(self, g: Group, slot: Slot, state: str) -> None:
        """The group's next choice, decoding in ``slot`` with its own seed."""
        seed = (g.base_seed + g.next_index) & 0x7FFFFFFF
        choice = Choice(
            g,
            g.next_index,
            slot,
            sampler_chain(g.req, seed, self.model),
            TextReleaser(g.req.stop),
            Frames(self._frame_s, stream=g.req.stream),
            greedy=greedy_bans(g.req, self.model),
            state=state,
        )
        self._speculation.start(choice)
        g.choices.append(choice)
        g.next_index += 1

    def first(self, c: Choice, at: At) -> None:
        """The choice's first token, from the row after its prompt."""
        token = self.sample(c, at)
        if c.drafts is not None:
            c.drafts.extend([token])

    def next(self, c: Choice, index: int) -> None:
        """A decoding choice's next token, from the row after its last one."""
        token = self.sample(c, index)
        if c.drafts is not None:
            c.drafts.settle([token])

    def verify(self, c: Choice, row: int, draft_rows: int, drafts: list[int]) -> None:
        """Walk the verify rows: ``row`` (after the pending token) then ``draft_rows``...
        (after each draft), keeping drafts while the sampler picks them; the first token it
        picks otherwise is its own, and the cells after the kept tokens are removed."""
        end = len(c.slot.tokens) + len(drafts)  # cells written: the pending token and drafts
        emitted: list[int] = []
        for j in range(len(drafts) + 1):
            token = self.sample(c, row if j == 0 else draft_rows + j - 1)
            emitted.append(token)
            if c.state == "done" or j == len(drafts) or token != drafts[j]:
                break
            c.slot.tokens.append(token)  # an accepted draft: its cell already holds it
        c.drafted += len(drafts)
        c.accepted += len(emitted) - 1
        if len(c.slot.tokens) < end:
            self._ctx.seq_rm(c.slot.seq_id, len(c.slot.tokens), -1)
        assert c.drafts is not None
        c.drafts.settle(emitted)

    def sample(self, c: Choice, at: At) -> int:
        """Sample from row ``at`` and emit the token; returns it (even when it ends the
        choice: an end-of-generation token, a stop string, the budget)."""
        g, req = c.group, c.group.req
        if c.t_first is None:
            c.t_first = time.perf_counter()
        token = self.pick(c, at)
        c.state = "decode"
        if self.model.is_eog(token):
            self.finish(c, "stop")
            return token
        c.completion += 1
        c.last = token
        lp = self._logprob(at, token, req.logprobs) if req.logprobs is not None else None
        out = c.releaser.push(token, self.model.piece(token), lp)
        if (frame := c.frames.push(out, time.perf_counter())) is not None:
            g.send(Delta(c.index, frame.text, tuple(frame.token_ids), tuple(frame.logprobs)))
        if c.releaser.stopped:
            self.finish(c, "stop")
        elif c.completion >= req.max_tokens or (
            req.time_budget_s is not None and time.perf_counter() - g.t0 > req.time_budget_s
        ):
            self.finish(c, "length")
        return token

    def pick(self, c: Choice, at: At) -> int:
        """The token row ``at`` gives choice ``c``: its sampler's pick."""
        if c.greedy is not None:
            return greedy_pick(self._row(at), c.greedy)
        if isinstance(at, np.ndarray):
            return sample_row(c.sampler, at)
        return int(self._lib.llama_sampler_sample(c.sampler, self._ctx.ptr, at))

    def _row(self, at: At) -> np.ndarray:
        return at if isinstance(at, np.ndarray) else self._ctx.logits(at, self._n_vocab)

    def _logprob(self, at: At, token: int, top_n: int) -> TokenLogprob:
        return logprob_entry(self._row(at), token, top_n, self.model.detokenize)

    def send_held(self, choices: list[Choice]) -> None:
        """Send the text the choices' streams hold now: a step that may run long comes next."""
        for c in choices:
            if (out := c.frames.before_long_step()) is not None:
                c.group.send(Delta(c.index, out.text, tuple(out.token_ids), tuple(out.logprobs)))

    def finish(self, c: Choice, reason: FinishReason) -> None:
        g = c.group
        tail = c.frames.take()
        if reason != "cancelled":
            tail.extend(c.releaser.finish())
        if tail:
            g.send(Delta(c.index, tail.text, tuple(tail.token_ids), tuple(tail.logprobs)))
        now = time.perf_counter()
        first = c.t_first or now
        g.send(
            Finished(
                c.index,
                reason,
                Timings(
                    prompt_tokens=len(g.req.prompt),
                    cached_tokens=g.cached,
                    completion_tokens=c.completion,
                    prompt_ms=(first - g.t0) * 1e3,
                    decode_ms=(now - first) * 1e3,
                    drafted=c.drafted,
                    accepted=c.accepted,
                    # Without drafts, one forward pass per token (the first is the prompt's).
                    target_passes=c.passes + 1 if c.drafted else c.completion,
                ),
            )
        )
        c.state = "done"
        g.finished += 1
        self._lib.llama_sampler_free(c.sampler)
        if g.remaining > 0 and reason != "cancelled" and not g.cancelled():
            # More choices than slots: this slot goes back to the prompt for the next one.
            prompt_len = len(g.req.prompt)
            self._ctx.seq_rm(c.slot.seq_id, prompt_len - 1, -1)
            c.slot.tokens = c.slot.tokens[: prompt_len - 1]
            self.new(g, c.slot, state="eval_last")

    def finish_all(self, g: Group, reason: FinishReason) -> None:
        """Finish every choice of the group not finished yet, the unstarted first (a finished
        choice would otherwise hand its slot to the next one)."""
        while g.remaining > 0:
            self.finish_unstarted(g, reason)
        for c in g.choices:
            if c.state != "done":
                self.finish(c, reason)

    def prompt_ready(self, g: Group, at: At) -> None:
        """The prompt is in the primary's KV cache (the logits after it in row ``at`` of the
        step that evaluated it, kept for the prompt's next time, or kept from an earlier time):
        copy it to the other choices and sample their first tokens."""
        assert g.primary is not None
        if not isinstance(at, np.ndarray):
            self._prompt_logits.put(g.req.prompt, self._ctx.logits(at, self._n_vocab))
        if g.req.max_tokens <= 0:  # a warm-up: the cache is filled, nothing to generate
            self.finish_all(g, "length")
            return
        for c in g.choices:
            if c.slot is not g.primary:
                self._ctx.seq_rm(c.slot.seq_id, -1, -1)
                self._ctx.seq_cp(g.primary.seq_id, c.slot.seq_id)
                c.slot.tokens = list(g.primary.tokens)
            self.first(c, at)

    def abandon(self, g: Group) -> None:
        """Free the group's live choices without a word: it is ending with an error."""
        for c in g.choices:
            if c.state != "done":
                self._lib.llama_sampler_free(c.sampler)
                c.state = "done"

    def finish_unstarted(self, g: Group, reason: FinishReason) -> None:
        """Finish the group's next choice before it ever took a slot."""
        g.send(Finished(g.next_index, reason, Timings(len(g.req.prompt), g.cached, 0, 0, 0)))
        g.next_index += 1
        g.finished += 1
