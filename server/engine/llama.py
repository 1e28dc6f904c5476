"""The simple engine: one ``llama_cpp.Llama`` context, one sequence at a time.

It reuses the KV cache of the longest common prefix with the previous request (``Llama.generate``
does the matching), asks llama.cpp for the last row of logits only, and reads that row itself when
logprobs are requested instead of turning on ``logits_all`` (n_ctx × vocab floats). Greedy
requests may decode speculatively (``server.engine.speculative``), from prompt lookup or from a
draft model loaded alongside.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from server.engine.base import (
    KV_BYTES_PER_ELEMENT,
    Delta,
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    Timings,
    TokenLogprob,
    open_llama,
)
from server.engine.devices import list_devices, report_load
from server.engine.drafters import DraftModel, check_same_vocabulary
from server.engine.fim import detect_fim
from server.engine.sampling import common_prefix, logprob_entry
from server.engine.speculative import RunStats, SpeculativeDecoder, Step
from server.engine.text import TextReleaser
from server.errors import InvalidRequest, ModelUnavailable
from server.registry import ModelConfig

log = logging.getLogger(__name__)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LlamaEngine:
    slots = 1

    def __init__(
        self, path: Path, cfg: ModelConfig, *, draft: tuple[Path, ModelConfig] | None = None
    ):
        import llama_cpp

        self._lib = llama_cpp
        self.cfg = cfg
        _log_flash_attn(cfg)
        threads = cfg.n_threads or _available_cores()
        devices_before = list_devices()
        try:
            self.llm = open_llama(path, cfg, n_ctx=cfg.n_ctx, threads=threads)
        except (ValueError, RuntimeError) as e:
            raise ModelUnavailable(
                f"model {cfg.name!r}: llama.cpp could not load {path} with n_ctx={cfg.n_ctx} "
                f"kv_cache={cfg.kv_cache} flash_attn={cfg.flash_attn} "
                f"n_gpu_layers={cfg.n_gpu_layers}: {e}"
            ) from e
        try:
            self._draft = self._load_draft(draft, threads) if draft else None
        except BaseException:
            self.llm.close()
            raise
        self._spec = SpeculativeDecoder(cfg.name, self.llm, self._draft)
        self.last_run = RunStats()
        model = self.llm._model
        self._vocab = model.vocab
        self._n_vocab = self.llm.n_vocab()
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        self._add_bos = model.add_bos_token()
        self.info = ModelInfo(
            n_ctx=self.llm.n_ctx(),
            n_vocab=self._n_vocab,
            chat_template=cfg.chat_template or self.llm.metadata.get("tokenizer.chat_template"),
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            # A draft model is part of this one: its file and cache count towards its memory.
            size_bytes=path.stat().st_size + (draft[0].stat().st_size if draft else 0),
            kv_cache_bytes=self._kv_cache_bytes(self.llm, cfg.kv_cache)
            + (self._kv_cache_bytes(self._draft.llm, self._draft.cfg.kv_cache) if draft else 0),
            bos_id=bos if self._add_bos and bos != -1 else None,
            fim=detect_fim(LlamaVocab(self.llm), cfg.fim, cfg.name),
        )
        self.piece = lru_cache(maxsize=None)(self._piece)
        self.placement = report_load(
            cfg.name,
            devices_before,
            cfg.n_gpu_layers,
            llama_cpp.llama_model_n_layer(self.llm.model),
            llama_cpp.llama_supports_gpu_offload(),
        )
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

    def _load_draft(self, draft: tuple[Path, ModelConfig], threads: int) -> DraftModel:
        path, dcfg = draft
        check_same_vocabulary(self.cfg.name, self.llm, dcfg.name, path)
        return DraftModel.load(path, dcfg, self.llm.n_ctx(), threads)

    @staticmethod
    def _kv_cache_bytes(llm, kv_cache: str) -> int:
        import llama_cpp as lib

        model, meta = llm.model, llm.metadata
        arch = meta.get("general.architecture", "")
        n_head = lib.llama_model_n_head(model)
        head_dim = lib.llama_model_n_embd(model) // max(n_head, 1)
        k_dim = int(meta.get(f"{arch}.attention.key_length", head_dim))
        v_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
        per_token = (
            lib.llama_model_n_layer(model) * lib.llama_model_n_head_kv(model) * (k_dim + v_dim)
        )
        return int(per_token * llm.n_ctx() * KV_BYTES_PER_ELEMENT[kv_cache])

    # -- vocabulary --------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos and self._add_bos, special=special)

    def kv_tokens(self) -> int:
        return self.llm.n_tokens

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

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
        if plan is None:
            steps = self._plain_steps(req, seed)
        else:
            mode, k_max = plan
            adaptive = self.cfg.draft_adaptive
            steps = self._spec.run(req.prompt, mode, k_max, adaptive, req.max_tokens, stats)
        try:
            for step in steps if req.max_tokens > 0 else ():
                token = step.token
                if completion == 0:
                    t_first = time.perf_counter()
                if self._is_end_of_generation(token):
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
        if not _is_greedy(req.sampling) or not req.prompt:
            return None
        return mode, req.speculation.max_draft or self.cfg.draft_max

    def _plain_steps(self, req: GenerationRequest, seed: int) -> Iterator[Step]:
        s = req.sampling
        self.llm.set_seed(seed)
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
            row = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self._n_vocab,))
        return logprob_entry(row, token, top_n, self.detokenize)

    def close(self) -> None:
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


class LlamaVocab:
    """The FIM detector's view of a llama.cpp vocabulary (a full model or a vocab-only GGUF)."""

    def __init__(self, llm):
        import llama_cpp

        self._llm = llm
        self._lib = llama_cpp
        self._vocab = llm._model.vocab

    def fim_ids(self) -> tuple[int, int, int]:
        lib, v = self._lib, self._vocab
        return lib.llama_vocab_fim_pre(v), lib.llama_vocab_fim_suf(v), lib.llama_vocab_fim_mid(v)

    def token_text(self, token: int) -> str:
        return self._llm._model.token_get_text(token)

    def find(self, text: str) -> int | None:
        ids = self._llm.tokenize(text.encode(), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 and self.token_text(ids[0]) == text else None
