"""The simple engine: one ``llama_cpp.Llama`` context, one sequence at a time.

It reuses the KV cache of the longest common prefix with the previous request (``Llama.generate``
does the matching), asks llama.cpp for the last row of logits only, and reads that row itself when
logprobs are requested instead of turning on ``logits_all`` (n_ctx × vocab floats). Greedy
requests may decode speculatively (``server.engine.speculative``), from prompt lookup or from a
draft model loaded alongside.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama import LogitsProcessorList
from llama_cpp.llama_grammar import LlamaGrammar

from server.engine import binding
from server.engine.base import (
    CacheStats,
    CancelFlag,
    Delta,
    EmbeddingRequest,
    End,
    Event,
    EventSink,
    Finished,
    FinishReason,
    GenerationRequest,
    Request,
    SamplingParams,
    Timings,
    TokenLogprob,
    available_cores,
    await_taken,
    open_llama,
)
from server.engine.devices import list_devices, report_load
from server.engine.drafters import DraftModel, check_same_vocabulary
from server.engine.model import Model
from server.engine.sampling import common_prefix, logprob_entry, sampler_chain
from server.engine.speculative import RunStats, SpeculativeDecoder, Step
from server.engine.text import TextReleaser
from server.errors import InvalidRequest, ModelUnavailable
from server.registry import ModelConfig

log = logging.getLogger(__name__)


class LlamaEngine:
    """One sequence at a time on a ``Llama``'s own context, on one thread of its own."""

    capacity = 1

    def __init__(
        self, path: Path, cfg: ModelConfig, *, draft: tuple[Path, ModelConfig] | None = None
    ):
        self._lib = llama_cpp
        self.cfg = cfg
        _log_flash_attn(cfg)
        threads = self._threads = cfg.n_threads or available_cores()
        devices_before = list_devices()
        try:
            self.llm = open_llama(path, cfg, n_ctx=cfg.n_ctx, threads=threads)
        except (ValueError, RuntimeError) as e:
            raise ModelUnavailable(
                f"model {cfg.name!r}: llama.cpp could not load {path} with n_ctx={cfg.n_ctx} "
                f"kv_cache={cfg.kv_cache} flash_attn={cfg.flash_attn} "
                f"n_gpu_layers={cfg.n_gpu_layers}: {e}"
            ) from e
        self.model = Model.of_llama(self.llm, path, cfg)
        try:
            self._draft = self._load_draft(draft, threads) if draft else None
        except BaseException:
            self.llm.close()
            raise
        self._spec = SpeculativeDecoder(cfg.name, self.llm, self._draft)
        self.last_run = RunStats()
        self._n_vocab = self.model.n_vocab
        # A draft model is part of this one: its file and cache count towards its memory.
        self.info = dataclasses.replace(
            self.model.info,
            size_bytes=self.model.info.size_bytes + (draft[0].stat().st_size if draft else 0),
            kv_cache_bytes=self.model.info.kv_cache_bytes
            + (self._draft.model.info.kv_cache_bytes if self._draft else 0),
        )
        self.kv_cells = cfg.n_ctx
        self.piece = self.model.piece
        self.placement = report_load(
            cfg.name,
            devices_before,
            cfg.n_gpu_layers,
            self.model.n_layer,
            llama_cpp.llama_supports_gpu_offload(),
        )
        self._jobs: queue.Queue[tuple[GenerationRequest, EventSink, CancelFlag] | None] = (
            queue.Queue()
        )
        self._thread = threading.Thread(target=self._run, name=f"decode-{cfg.name}", daemon=True)
        self._thread.start()
        log.info(
            "loaded %s: n_ctx=%d vocab=%d threads=%d kv=%s flash_attn=%s gpu_layers=%d fim=%s "
            "speculative=%s draft=%s",
            cfg.name,
            self.info.n_ctx,
            self._n_vocab,
            threads,
            cfg.kv_cache,
            cfg.flash_attn,
            cfg.n_gpu_layers,
            self.info.fim.family if self.info.fim else "none",
            cfg.speculative_mode,
            self._draft.cfg.name if self._draft else "none",
        )

    def submit(self, request: Request, sink: EventSink) -> CancelFlag:
        if isinstance(request, EmbeddingRequest):
            raise InvalidRequest(
                f"model {self.cfg.name!r} generates text; it has no embeddings", param="model"
            )
        self._speculation(request)  # a bad speculation setting is the caller's 400
        # Parsed once here so a grammar that does not parse is the caller's 400.
        self._lib.llama_sampler_free(sampler_chain(request, 0, self.model))
        handle = CancelFlag()
        self._jobs.put((request, sink, handle))
        return handle

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            request, sink, handle = job
            try:
                for event in self.generate(request, handle.is_set):
                    sink(event)
                    if isinstance(event, Delta):  # sent before the next step, not during it
                        await_taken([sink], self._threads)
            except Exception as e:
                log.exception("generation failed on model %s", self.cfg.name)
                sink(End(e))
            else:
                sink(End(None))

    def _load_draft(self, draft: tuple[Path, ModelConfig], threads: int) -> DraftModel:
        path, dcfg = draft
        check_same_vocabulary(self.cfg.name, self.llm, dcfg.name, path)
        return DraftModel.load(path, dcfg, self.llm.n_ctx(), threads)

    # -- vocabulary --------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_bos=add_bos, special=special)

    def kv_tokens(self) -> int:
        return int(self.llm.n_tokens)

    def cache_stats(self) -> CacheStats:
        return CacheStats()  # one sequence: its prefix reuse is Llama's own

    def cpu_threads(self) -> int:
        return self._threads

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    # -- generation --------------------------------------------------------------------------

    def generate(self, req: GenerationRequest, cancelled: Callable[[], bool]) -> Iterator[Event]:
        base_seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(31)
        for index in range(req.n):
            if cancelled():
                return
            yield from self._one(index, req, (base_seed + index) & 0x7FFFFFFF, cancelled)

    def _one(
        self, index: int, req: GenerationRequest, seed: int, cancelled: Callable[[], bool]
    ) -> Iterator[Event]:
        t0 = time.perf_counter()
        plan = self._speculation(req)
        s = req.sampling
        if s.seed is not None and s.temperature > 0:
            # llama.cpp's logits depend on how the prompt was split into batches (measured: up to
            # 0.75 apart on SmolLM2 when the last token is evaluated alone), so a reused prefix can
            # change what a seed samples. A seeded request promises reproducible text: go cold.
            self.llm.reset()
        cached = common_prefix(self.llm.input_ids[: self.llm.n_tokens], req.prompt)
        releaser = TextReleaser(req.stop)
        completion = accepted = 0
        reason: FinishReason = "length"
        t_first = t0
        stats = self.last_run = RunStats()  # kept for benchmarks: K per pass
        steps: Generator[Step, None, None]
        if req.max_tokens <= 0:  # a warm-up: evaluate the prompt into the cache, sample nothing
            steps = self._warm_up(req)
        elif plan is None:
            steps = self._plain_steps(req, seed)
        else:
            mode, k_max = plan
            adaptive = self.cfg.draft_adaptive
            steps = self._spec.run(req.prompt, mode, k_max, adaptive, req.max_tokens, stats)
        try:
            for step in steps:
                token = step.token
                if completion == 0:
                    t_first = time.perf_counter()
                if self.model.is_eog(token):
                    reason = "stop"
                    break
                completion += 1
                accepted += step.drafted
                lp = (
                    self._logprob(token, req.logprobs, step.logits)
                    if req.logprobs is not None
                    else None
                )
                out = releaser.push(token, self.piece(token), lp)
                if out:
                    yield Delta(index, out.text, tuple(out.token_ids), tuple(out.logprobs))
                if releaser.stopped:
                    reason = "stop"
                    break
                if completion >= req.max_tokens:
                    break
                if req.time_budget_s is not None and time.perf_counter() - t0 > req.time_budget_s:
                    break  # a runaway completion must not hold the editor's model
                if cancelled():
                    reason = "cancelled"
                    break
        finally:
            steps.close()
        tail = releaser.finish()
        if tail:
            yield Delta(index, tail.text, tuple(tail.token_ids), tuple(tail.logprobs))
        t_end = time.perf_counter()
        yield Finished(
            index,
            reason,
            Timings(
                prompt_tokens=len(req.prompt),
                cached_tokens=cached,
                completion_tokens=completion,
                prompt_ms=(t_first - t0) * 1e3,
                decode_ms=(t_end - t_first) * 1e3,
                drafted=stats.drafted,
                accepted=accepted,
                # Without speculation: one forward pass per token.
                target_passes=stats.passes if plan is not None else completion,
            ),
        )

    def _speculation(self, req: GenerationRequest) -> tuple[str, int] | None:
        """(mode, K at most) when this request decodes speculatively, else None."""
        mode = req.speculation.mode or self.cfg.speculative_mode
        if mode == "off":
            return None
        if mode == "draft" and self._draft is None:
            raise InvalidRequest(
                f"model {self.cfg.name!r} has no draft model, so it cannot decode with "
                'speculative = "draft"; name one in models.toml (draft = "NAME") or use '
                '"prompt_lookup"',
                param="speculative",
            )
        # Only greedy output is verified; sampled requests decode plainly (see speculative.py).
        # Constrained requests too: drafts are verified against the raw argmax, not the constraint.
        constrained = req.grammar is not None or req.logit_bias or req.ignore_eos
        if not _is_greedy(req.sampling) or not req.prompt or constrained:
            return None
        return mode, req.speculation.max_draft or self.cfg.draft_max

    def _warm_up(self, req: GenerationRequest) -> Generator[Step, None, None]:
        gen = self.llm.generate(req.prompt, temp=0, reset=True)
        next(gen)  # evaluates the prompt and picks a token it does not keep
        gen.close()
        yield from ()

    def _plain_steps(self, req: GenerationRequest, seed: int) -> Generator[Step, None, None]:
        s = req.sampling
        self.llm.set_seed(seed)
        biases = dict(req.logit_bias)
        if req.ignore_eos:
            biases.update((t, float("-inf")) for t in self.model.eog_tokens())
        processors = None
        if biases:
            ids = np.fromiter(biases, dtype=np.int64, count=len(biases))
            values = np.fromiter(biases.values(), dtype=np.float32, count=len(biases))

            def bias(_: Any, scores: np.ndarray) -> np.ndarray:
                scores[ids] += values
                return scores

            processors = LogitsProcessorList([bias])
        grammar = (
            LlamaGrammar.from_string(req.grammar, verbose=False)
            if req.grammar is not None
            else None
        )
        gen = self.llm.generate(
            req.prompt,
            temp=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            reset=True,
            logits_processor=processors,
            grammar=grammar,
        )
        try:
            for token in gen:
                yield Step(token, None)
        finally:
            gen.close()

    def _logprob(self, token: int, top_n: int, row: np.ndarray | None = None) -> TokenLogprob:
        if row is None:
            # The row of the decode step that produced `token` is still in the context:
            # Llama.generate evaluates the token only after the consumer asks for the next one.
            row = binding.llama_logits_row(self.llm, -1, self._n_vocab)
        return logprob_entry(row, token, top_n, self.detokenize)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        while not self._jobs.empty():  # nobody is left waiting for an End
            job = self._jobs.get_nowait()
            if job is not None:
                job[1](End(ModelUnavailable(f"model {self.cfg.name!r} was unloaded")))
        self._spec.close()
        self.llm.close()


def _is_greedy(s: SamplingParams) -> bool:
    return (
        s.temperature == 0
        and s.repeat_penalty == 1
        and s.frequency_penalty == 0
        and s.presence_penalty == 0
    )


def _log_flash_attn(cfg: ModelConfig) -> None:
    explicit = "flash_attn" in cfg.model_fields_set
    if cfg.flash_attn and not explicit:
        why = (
            f"llama.cpp needs it for a quantized ({cfg.kv_cache}) V cache"
            if cfg.kv_cache != "f16"
            else "speculative decoding verifies drafts exactly with it"
        )
        log.info("%s: flash attention turned on: %s", cfg.name, why)
    elif not cfg.flash_attn and cfg.speculative_mode != "off":
        log.warning(
            "%s: flash_attn = false: speculative greedy output can differ from plain decoding "
            "where the top two tokens nearly tie (without flash attention llama.cpp computes a "
            "row inside a batch slightly differently from a lone token)",
            cfg.name,
        )
