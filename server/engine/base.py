"""The engine seam: what the scheduler asks of a model, whatever drives it.

An engine receives a ``GenerationRequest`` (prompt token ids, sampling, stop strings, n) and yields
``Delta`` events (released text with its tokens) and one ``Finished`` event per choice. Text is
released only once it cannot be the start of a stop string, so deltas concatenate to the final
text exactly. Engines run on one worker thread; ``cancelled`` is polled between tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from server.engine.fim import FimTokens

FinishReason = Literal["stop", "length", "cancelled"]

# ggml block sizes: q8_0 stores 32 values in 34 bytes, q4_0 in 18.
KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def ggml_kv_type(kv_cache: str) -> int:
    """llama.cpp's GGML_TYPE_* for a `kv_cache` setting ("f16", "q8_0", "q4_0")."""
    import llama_cpp

    return getattr(llama_cpp, f"GGML_TYPE_{kv_cache.upper()}")


def open_llama(path, cfg, *, n_ctx: int, threads: int):
    """A ``llama_cpp.Llama`` for a GGUF with a model's settings (ValueError if it cannot load)."""
    import llama_cpp

    kv_type = ggml_kv_type(cfg.kv_cache)
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=cfg.n_batch,
        n_ubatch=cfg.n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=cfg.n_gpu_layers,
        type_k=kv_type,
        type_v=kv_type,
        flash_attn=cfg.flash_attn,
        kv_overrides=cfg.kv_overrides or None,
        verbose=False,
    )


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None


SpeculationMode = Literal["off", "prompt_lookup", "draft"]


@dataclass(frozen=True)
class Speculation:
    """Per-request speculative decoding; None fields fall back to the model's configuration."""

    mode: SpeculationMode | None = None
    max_draft: int | None = None  # upper bound on drafted tokens per target step (K)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None  # top-N alternatives per token; None: no logprobs at all
    time_budget_s: float | None = None  # stop with "length" once generation has run this long
    speculation: Speculation = field(default_factory=Speculation)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float]
    text_offset: int


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was reused instead of evaluated
    completion_tokens: int
    prompt_ms: float  # request start → first token sampled (TTFT on the engine)
    decode_ms: float  # first token → last token
    drafted: int = 0  # speculative tokens proposed
    accepted: int = 0  # ... and accepted by the target
    target_passes: int = 0  # target forward passes while decoding (tokens/pass = speedup bound)


@dataclass(frozen=True)
class Finished:
    index: int
    reason: FinishReason
    timings: Timings


Event = Delta | Finished


@dataclass(frozen=True)
class ModelInfo:
    n_ctx: int
    n_vocab: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    size_bytes: int  # the GGUF file
    kv_cache_bytes: int = 0  # K and V caches at n_ctx
    bos_id: int | None = None  # prepended to prompts (None: the vocabulary adds no BOS)
    fim: FimTokens | None = None  # None: the model cannot fill in the middle

    @property
    def memory_bytes(self) -> int:
        return self.size_bytes + self.kv_cache_bytes


class Engine(Protocol):
    info: ModelInfo
    # How many generate() calls may run at once, each on its own worker thread. The simple engine
    # serves one; a batched engine steps all of its slots in one llama_decode per token.
    slots: int

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """Token ids for text; with `special`, marker text like <|im_end|> becomes its token."""
        ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def kv_tokens(self) -> int:
        """Tokens currently held in the KV cache (read from other threads for metrics)."""
        ...

    def generate(self, req: GenerationRequest, cancelled: Callable[[], bool]) -> Iterator[Event]:
        """Generate ``req.n`` choices; every choice ends with exactly one ``Finished``."""
        ...

    def close(self) -> None: ...
