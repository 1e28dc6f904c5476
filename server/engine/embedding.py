"""The embedding engine: llama.cpp's embedding mode, several inputs per decode.

One ``llama_cpp.Llama(embedding=True)`` context; llama.cpp pools each sequence the way the model
was trained to (the GGUF's pooling type: mean for all-MiniLM) and this engine L2-normalises.
Submitted requests queue to one decode thread, which packs the inputs of every waiting request
into one batch, each input its own sequence id, up to ``n_batch`` tokens and the context's
sequence limit: concurrent callers share decodes instead of taking turns. A non-causal model
(BERT) needs each sequence whole in one micro-batch, so ``n_ubatch = n_batch >= n_ctx``. The
context keeps nothing between batches (BERT has no KV cache; a causal embedding model's cache is
cleared), so there is no prefix reuse to manage and ``kv_tokens`` is always 0.

Only public llama-cpp-python API is used: ``Llama(embedding=True)``, its ``ctx``/``model``
properties and the C functions ``llama_batch_init``, ``llama_decode``, ``llama_get_embeddings_seq``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.engine.base import (
    CacheStats,
    Embedded,
    EmbeddingRequest,
    End,
    Event,
    EventSink,
    Handle,
    ModelInfo,
    Request,
)
from server.errors import ContextOverflow, InvalidRequest, ModelUnavailable
from server.registry import ModelConfig

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    """One submitted request: its handle, and how many of its inputs are still to be embedded."""

    request: Request
    sink: EventSink
    cancelled: threading.Event = field(default_factory=threading.Event)
    remaining: int = 0
    ended: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        if self.ended:
            return
        self.ended = isinstance(event, End)
        try:
            self.sink(event)
        except Exception:  # a broken sink must not stop the decode thread for everyone else
            log.exception("embedding event sink failed")


class EmbeddingEngine:
    def __init__(self, path: Path, cfg: ModelConfig, *, slots: int = 8):
        import llama_cpp

        self._lib = llama_cpp
        self.cfg = cfg
        threads = self._threads = cfg.n_threads or len(os.sched_getaffinity(0))
        self._n_batch = max(cfg.n_batch, cfg.n_ctx)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                n_ctx=cfg.n_ctx,
                n_batch=self._n_batch,
                n_ubatch=self._n_batch,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=cfg.n_gpu_layers,
                flash_attn=cfg.flash_attn,
                kv_overrides=cfg.kv_overrides or None,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise ModelUnavailable(
                f"model {cfg.name!r}: llama.cpp could not load {path} for embeddings: {e}"
            ) from e
        ctx, model = self.llm.ctx, self.llm.model
        pooling = llama_cpp.llama_pooling_type(ctx)
        if pooling in (llama_cpp.LLAMA_POOLING_TYPE_NONE, llama_cpp.LLAMA_POOLING_TYPE_RANK):
            self.llm.close()
            raise ModelUnavailable(
                f"model {cfg.name!r}: its GGUF pools no sentence vector (pooling type {pooling}); "
                "set `kv_overrides` bert.pooling_type (1 mean, 2 cls, 3 last) in models.toml"
            )
        self._n_seq_max = llama_cpp.llama_n_seq_max(ctx)
        self._n_embd = self.llm.n_embd()
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        self.info = ModelInfo(
            # Positions past the trained length have no embedding, whatever n_ctx says.
            n_ctx=min(self.llm.n_ctx(), llama_cpp.llama_model_n_ctx_train(model)),
            n_vocab=self.llm.n_vocab(),
            chat_template=None,
            bos_token=self._piece(bos),
            eos_token=self._piece(eos),
            size_bytes=path.stat().st_size,
            bos_id=bos if bos != -1 else None,
            embedding=True,
            n_embd=self._n_embd,
        )
        # Requests admitted at once: they are batched together, so more than one pays off.
        self.capacity = slots
        # The tokens one decode holds; nothing stays cached between decodes (kv_tokens() is 0).
        self.kv_cells = self._n_batch
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"embed-{cfg.name}", daemon=True)
        self._thread.start()
        log.info(
            "loaded %s for embeddings: n_ctx=%d n_embd=%d pooling=%d batch=%d tokens/%d sequences "
            "threads=%d",
            cfg.name,
            self.info.n_ctx,
            self._n_embd,
            pooling,
            self._n_batch,
            self._n_seq_max,
            threads,
        )

    # -- the engine contract -----------------------------------------------------------------

    def submit(self, request: Request, sink: EventSink) -> Handle:
        job = _Job(request, sink)
        self._queue.put(job)
        return job

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        # For a WordPiece vocabulary add_bos means the whole frame: [CLS] ... [SEP].
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def kv_tokens(self) -> int:
        return 0

    def cache_stats(self) -> CacheStats:
        return CacheStats()  # no prompt cache: every input is evaluated whole

    def cpu_threads(self) -> int:
        return self._threads

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._lib.llama_batch_free(self._batch)
        self.llm.close()

    # -- the decode thread -------------------------------------------------------------------

    def _run(self) -> None:
        pending: deque[tuple[_Job, int]] = deque()  # (request, input index), first come first
        while True:
            block = not pending
            while True:  # take every request waiting now, so they share the next decodes
                try:
                    job = self._queue.get(block=block)
                except queue.Empty:
                    break
                if job is None:
                    self._abandon(pending)
                    return
                pending.extend((job, i) for i in range(self._admit(job)))
                block = False
            for job, _ in pending:
                if job.cancelled.is_set():
                    job.emit(End())
            pending = deque(item for item in pending if not item[0].ended)
            if pending:
                self._step(pending)

    def _admit(self, job: _Job) -> int:
        """Check a request; the number of its inputs to embed (0: it has already ended)."""
        req = job.request
        if not isinstance(req, EmbeddingRequest):
            job.emit(End(InvalidRequest(self._not_generative(), param="model")))
            return 0
        for i, tokens in enumerate(req.inputs):
            problem = self._check_input(i, tokens)
            if problem is not None:
                job.emit(End(problem))
                return 0
        job.remaining = len(req.inputs)
        if job.remaining == 0:
            job.emit(End())
        return job.remaining

    def _not_generative(self) -> str:
        return f"model {self.cfg.name!r} is an embedding model; it cannot generate text"

    def _check_input(self, i: int, tokens: list[int]) -> InvalidRequest | None:
        if not tokens:
            return InvalidRequest(f"input {i} is empty", param="input")
        if len(tokens) > self.info.n_ctx:
            return ContextOverflow(
                f"input {i} has {len(tokens)} tokens, more than the model's context of "
                f"{self.info.n_ctx}",
                param="input",
            )
        if min(tokens) < 0 or max(tokens) >= self.info.n_vocab:
            return InvalidRequest(
                f"input {i}: token ids must be in [0, {self.info.n_vocab})", param="input"
            )
        return None

    def _step(self, pending: deque[tuple[_Job, int]]) -> None:
        """Embed as many pending inputs as one decode takes, then deliver them."""
        taken: list[tuple[_Job, int]] = []
        n_tokens = 0
        while pending and len(taken) < self._n_seq_max:
            job, i = pending[0]
            size = len(self._inputs(job)[i])
            if taken and n_tokens + size > self._n_batch:
                break
            taken.append(pending.popleft())
            n_tokens += size
        try:
            vectors = self._decode([self._inputs(job)[i] for job, i in taken])
        except Exception as e:
            log.exception("embedding decode failed on model %s", self.cfg.name)
            failed = {id(job) for job, _ in taken}
            for job, _ in taken:
                job.emit(End(e))
            for job, _ in pending:
                if id(job) in failed:
                    job.emit(End(e))
            return
        for (job, i), vec in zip(taken, vectors, strict=True):
            if job.ended:
                continue
            req = job.request
            assert isinstance(req, EmbeddingRequest)
            if req.normalize:
                vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
            job.emit(Embedded(index=i, vector=tuple(vec.tolist()), tokens=len(req.inputs[i])))
            job.remaining -= 1
            if job.remaining == 0:
                job.emit(End())

    @staticmethod
    def _inputs(job: _Job) -> list[list[int]]:
        assert isinstance(job.request, EmbeddingRequest)
        return job.request.inputs

    def _decode(self, sequences: list[list[int]]) -> list[np.ndarray]:
        lib, ctx, b = self._lib, self.llm.ctx, self._batch
        k = 0
        for seq, tokens in enumerate(sequences):
            for pos, token in enumerate(tokens):
                b.token[k] = token
                b.pos[k] = pos
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = seq
                # Every token is an output in embedding mode; llama.cpp pools them per sequence.
                b.logits[k] = 1
                k += 1
        b.n_tokens = k
        memory = lib.llama_get_memory(ctx)
        if memory:  # a causal embedding model: forget the previous batch's sequences
            lib.llama_memory_clear(memory, True)
        rc = lib.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on {len(sequences)} inputs")
        vectors = []
        for seq in range(len(sequences)):
            ptr = lib.llama_get_embeddings_seq(ctx, seq)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no pooled embedding for sequence {seq}")
            vectors.append(np.ctypeslib.as_array(ptr, shape=(self._n_embd,)).astype(np.float64))
        return vectors

    def _abandon(self, pending: deque[tuple[_Job, int]]) -> None:
        gone = ModelUnavailable(f"model {self.cfg.name!r} was unloaded")
        for job, _ in pending:
            job.emit(End(gone))
        while True:
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                return
            if waiting is not None:
                waiting.emit(End(gone))

    def _piece(self, token: int) -> str:
        if token == -1:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")
