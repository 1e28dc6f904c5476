"""The batched engine: one llama.cpp context, many sequences, one llama_decode per step.

Every active sequence contributes its next token to a single batch, so eight streams cost far less
than eight single steps (measured on SmolLM2, 2 cores: about 3 single steps at F16, 4 at Q4_1).
Requests join at the next step and leave when they finish or are cancelled (continuous batching);
prompts are evaluated in chunks within a per-step token budget, so a long prompt does not stall the
others' decoding. `n` choices share one evaluation of the prompt: its KV cache is copied to each
choice's sequence, which then samples with its own seed.

One decode-loop thread owns the context; `submit()` hands it a request and it emits the request's
events itself, gathered per step and handed over right before the next llama_decode (no thread
per request: on 2 cores each thread woken per token steals time from llama.cpp's threads). A slot
keeps its KV cache after its request for the next one sharing a prefix; which slot a prompt
takes and which idle caches stay in the buffer is server.engine.slot_cache, how a request takes
its slots (starting at once from the logits kept after its prompt, when it can) is
server.engine.batch_admission. Greedy sequences may speculate inside the shared step, with prompt
lookup or the model's draft model (server.engine.batch_speculation). What a choice does with its
logits rows once a step computed them (pick, verify drafts, release text, finish) is
server.engine.batch_choices.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time

from server.engine.base import (
    CacheStats,
    CancelFlag,
    EmbeddingRequest,
    Event,
    EventSink,
    Request,
    available_cores,
    await_taken,
    ggml_kv_type,
)
from server.engine.batch_admission import Admission
from server.engine.batch_choices import ChoiceTokens
from server.engine.batch_draft_model import BatchDraftModel
from server.engine.batch_speculation import BatchSpeculation
from server.engine.batch_state import Choice, Group, Slot
from server.engine.binding import BatchContext
from server.engine.cpu_share import SMALL_STEP, CpuShare
from server.engine.model import Model
from server.engine.prompt_cache import PromptCache
from server.engine.prompt_logits import PromptLogits
from server.engine.sampling import sampler_chain
from server.engine.slot_cache import SlotCaches
from server.errors import InvalidRequest, ModelUnavailable

log = logging.getLogger(__name__)

# How long the engine rests before it packs a spread-out KV buffer (SlotCaches.pack): the last
# answers are sent by then, and a request arriving while it packs waits a few milliseconds.
PACK_AFTER_S = 0.05


class BatchedEngine:
    def __init__(
        self,
        model: Model,
        slots: int = 8,
        prefill_chunk: int = 128,
        prompt_cache_mb: int = 0,
        draft: Model | None = None,
        frame_ms: float = 0.0,
    ):
        import llama_cpp

        cfg = model.cfg
        self._lib = llama_cpp
        threads = cfg.n_threads or available_cores()
        self.model = model
        self.capacity = slots
        self._prefill_chunk = prefill_chunk
        self._n_batch = max(cfg.n_batch, slots)
        try:
            # Each sequence gets its own n_ctx cells of one unified KV buffer (see BatchContext).
            self._ctx = BatchContext(
                model.weights,
                n_ctx=cfg.n_ctx * slots,
                n_seq=slots,
                n_batch=self._n_batch,
                threads=threads,
                kv_type=ggml_kv_type(cfg.kv_cache),
                flash_attn=cfg.flash_attn,
            )
        except ValueError as e:
            raise ModelUnavailable(
                f"model {cfg.name!r}: llama.cpp could not create a {slots}-sequence context of "
                f"{cfg.n_ctx} tokens each: {e}"
            ) from e
        self._n_vocab = model.n_vocab
        self._draft = self._draft_model(draft, slots, threads) if draft is not None else None
        self._cpu = CpuShare(threads) if cfg.adapt_threads else None
        self.prompt_cache = PromptCache(prompt_cache_mb << 20)
        cells = cfg.n_ctx * slots
        # A draft model is part of this one: its file and cache count towards its memory.
        self.info = dataclasses.replace(
            model.info,
            size_bytes=model.info.size_bytes + (draft.info.size_bytes if draft else 0),
            kv_cache_bytes=int(
                (model.kv_bytes_per_token + (draft.kv_bytes_per_token if draft else 0)) * cells
            ),
            prompt_cache_bytes=self.prompt_cache.max_bytes,
        )
        self.kv_cells = cells
        self._speculation = BatchSpeculation(model, self._ctx, self._n_batch, self._draft)
        self._prompt_logits = PromptLogits()
        self._choices = ChoiceTokens(
            self._ctx, model, self._speculation, self._prompt_logits, frame_ms / 1e3
        )
        self._slots = [Slot(i) for i in range(slots)]
        self._caches = SlotCaches(self._ctx, model, self._slots, self.prompt_cache, self._n_batch)
        self._admission = Admission(
            self._ctx,
            self._slots,
            self._caches,
            self._choices,
            self._prompt_logits,
            n_batch=self._n_batch,
            prefill_chunk=prefill_chunk,
        )
        self._incoming: list[Group] = []
        # A step's events, handed over just before the next llama_decode (see _flush).
        self._outbox: list[tuple[EventSink, Event]] = []
        self._groups: list[Group] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"decode-{cfg.name}", daemon=True)
        self._thread.start()
        log.info(
            "batched engine for %s: %d slots × %d tokens, prefill chunk %d, draft model %s",
            cfg.name,
            slots,
            cfg.n_ctx,
            prefill_chunk,
            draft.cfg.name if draft else "none",
        )

    def _draft_model(self, draft: Model, slots: int, threads: int) -> BatchDraftModel:
        cfg = self.model.cfg
        try:
            return BatchDraftModel.load(
                self.model,
                draft,
                n_seq=slots,
                n_batch=self._n_batch,
                threads=draft.cfg.n_threads or threads,
            )
        except ValueError as e:
            self._ctx.close()
            raise ModelUnavailable(
                f"model {cfg.name!r}: llama.cpp could not create a context for its draft model "
                f"{draft.cfg.name!r}: {e}"
            ) from e
        except ModelUnavailable:
            self._ctx.close()
            raise

    # -- the vocabulary is the model's ----------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def kv_tokens(self) -> int:
        return sum(len(s.tokens) for s in self._slots)

    def cache_stats(self) -> CacheStats:
        c = self.prompt_cache
        return CacheStats(c.bytes_held, c.hits, c.misses, self._caches.packs)

    def cpu_threads(self) -> int:
        return self._ctx.threads[0]

    # -- requests -----------------------------------------------------------------------------

    def submit(self, request: Request, sink: EventSink) -> CancelFlag:
        if isinstance(request, EmbeddingRequest):
            raise InvalidRequest(
                f"model {self.model.cfg.name!r} generates text; it has no embeddings",
                param="model",
            )
        # Built once here so a grammar that does not parse is the caller's 400, not a failed step.
        self._lib.llama_sampler_free(sampler_chain(request, 0, self.model))
        self._speculation.limit(request)  # a mode this engine lacks is the caller's 400
        handle = CancelFlag()
        seed = (
            request.sampling.seed if request.sampling.seed is not None else random.getrandbits(31)
        )

        def emit(event: Event) -> None:
            self._outbox.append((sink, event))

        group = Group(request, handle.is_set, emit, base_seed=seed)
        with self._wake:
            if self._closed:
                raise ModelUnavailable(f"model {self.model.cfg.name!r} is being unloaded")
            self._incoming.append(group)
            self._wake.notify()
        return handle

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        for g in self._incoming + self._groups:  # nobody is left waiting for an End
            g.end(ModelUnavailable(f"model {self.model.cfg.name!r} was unloaded"))
        self._flush()
        self._ctx.close()
        if self._draft is not None:
            self._draft.close()
        self.model.close()

    # -- the decode loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                pack = False
                while not self._closed and not self._groups and not self._incoming:
                    if self._cpu is not None:
                        self._cpu.rest()
                    if not self._caches.spread():
                        self._wake.wait()
                    elif not self._wake.wait(PACK_AFTER_S):
                        pack = True  # idle a while (the last answers are out): not under the lock
                        break
                if self._closed:
                    self._flush()
                    return
            if pack:
                self._caches.pack()
                continue
            try:
                if self._incoming:  # starting one may evaluate or measure for a while
                    self._send_held()
                    self._flush()
                if self._admit():
                    self._flush()
                self._step()
            except Exception as e:  # a failed decode fails the requests in it, not the server
                log.exception("batched decode step failed")
                for g in self._groups:
                    self._fail(g, e)
                self._groups = []
                self._flush()

    def _fail(self, g: Group, error: Exception) -> None:
        self._choices.abandon(g)
        self._release(g)
        g.end(error)

    def _flush(self) -> None:
        """Hand the events gathered since the last call to their sinks.

        Called right before llama_decode, so the event loop woken by the hand-off formats and
        sends while this thread waits rather than contend for the GIL with its sampling and batch
        building. When llama.cpp's threads fill every core, the step waits until the consumers
        have taken the events (a bounded wait): the loop then runs on a free core instead of
        preempting a compute thread mid-step, which stalls the others at their next barrier."""
        out, self._outbox = self._outbox, []
        for sink, event in out:
            sink(event)
        if out:
            await_taken(dict.fromkeys(sink for sink, _ in out), self._ctx.threads[0])

    def _admit(self) -> bool:
        """Start what waits while slots are free; whether one had its first token already."""
        first_token = False
        with self._wake:
            while self._incoming and self._admission.free_slots():
                g = self._incoming.pop(0)
                try:
                    first_token = self._admission.start(g, bool(self._groups)) or first_token
                except Exception as e:  # it fails alone; the requests decoding go on
                    log.exception("starting a request failed")
                    self._fail(g, e)
                    continue
                self._groups.append(g)
        return first_token

    def _step(self) -> None:
        entries: list[tuple[int, int, int, bool]] = []  # token, pos, seq, wants logits
        first_token = False
        owners: list[tuple[int, Choice | Group]] = []  # batch index → choice, or group
        # Checked every step: a client that left costs at most one token. Its group retires below.
        live = [g for g in self._groups if not g.cancelled()]
        decoding: list[Choice] = []
        for g in live:
            for c in g.choices:
                if c.state == "decode":
                    owners.append((len(entries), c))
                    entries.append((c.last, len(c.slot.tokens), c.slot.seq_id, True))
                    decoding.append(c)
                elif c.state == "eval_last":
                    prompt = g.req.prompt
                    owners.append((len(entries), c))
                    entries.append((prompt[-1], len(prompt) - 1, c.slot.seq_id, True))
        prefill = min(sum(len(g.pending) for g in live), self._prefill_chunk)
        first_draft = len(entries)
        if self._draft is not None:  # its passes release the GIL as the step does: send first
            self._flush()
        drafts = self._speculation.add_drafts(decoding, entries, prefill if entries else 0)
        budget = self._n_batch - len(entries)
        decode_entries = len(entries)
        if len(entries) > 0:
            budget = min(budget, self._prefill_chunk)  # keep the others' next token coming
        for g in live:
            if not g.pending or budget <= 0:
                continue
            chunk, g.pending = g.pending[:budget], g.pending[budget:]
            assert g.primary is not None  # set when the group started
            pos = len(g.primary.tokens)
            for i, t in enumerate(chunk):
                last = not g.pending and i == len(chunk) - 1
                if last:
                    owners.append((len(entries), g))
                entries.append((t, pos + i, g.primary.seq_id, last))
            g.primary.tokens.extend(chunk)
            budget -= len(chunk)
        if len(entries) > decode_entries:
            self._choices.send_held(decoding)  # a step with a prompt chunk runs longer
        if entries:
            self._flush()
            self._fit_threads()
            t0 = time.perf_counter()
            self._ctx.decode(entries)
            self._speculation.observe(len(entries), time.perf_counter() - t0)
            draft_row = first_draft
            for i, owner in owners:
                if isinstance(owner, Group):
                    self._choices.prompt_ready(owner, i)
                    first_token = first_token or owner.req.max_tokens > 0  # not a warm-up
                    continue
                if owner.state == "eval_last":
                    owner.slot.tokens.append(owner.group.req.prompt[-1])
                    self._choices.first(owner, i)
                    continue
                owner.slot.tokens.append(owner.last)
                owner.passes += 1
                mine = drafts.get(owner)
                if mine:
                    self._choices.verify(owner, i, draft_row, mine)
                    draft_row += len(mine)
                else:
                    self._choices.next(owner, i)
        self._retire()
        # Now, not before the next step: when none follows, or a first token waits to go out.
        if not entries or not self._groups or first_token:
            self._flush()
        if entries:
            self._caches.note_step(len(decoding), decode_entries)
            # A request's choices share their prompt's cells; packed, each would get a copy.
            one_each = all(g.req.n == 1 for g in self._groups)
            if self._groups and one_each and self._caches.interleaved():
                self._flush()  # what this step produced goes out while the cells are copied
                self._caches.pack()

    def _send_held(self) -> None:
        self._choices.send_held([c for g in self._groups for c in g.choices if c.state == "decode"])

    def _fit_threads(self) -> None:
        if self._cpu is None or (n := self._cpu.threads()) == self._ctx.threads:
            return
        log.info(
            "%s: %d (steps) and %d (prompt batches) of %d threads: other processes keep %.1f "
            "cores busy",
            self.model.cfg.name,
            *n,
            self._cpu.configured,
            self._cpu.others or 0.0,
        )
        self._ctx.set_threads(n, SMALL_STEP)
        if self._draft is not None:  # its passes meet the same barriers
            self._draft.fit_threads(n, SMALL_STEP)

    def _retire(self) -> None:
        for g in [g for g in self._groups if g.finished >= g.req.n or g.cancelled()]:
            # Every choice ends with a Finished event, or its generate() call would wait forever
            # (a client may leave after this step took its tokens: the choices are still live).
            self._choices.finish_all(g, "cancelled")
            self._release(g)
            self._groups.remove(g)
            g.end(None)

    def _release(self, g: Group) -> None:
        now = time.perf_counter()
        self._caches.note_use()
        for slot in g.slots():
            slot.busy = False
            slot.released = now
