"""The engine contract: what the scheduler asks of a model, whatever drives it.

``Engine.submit(request, sink)`` starts a request and returns a ``Handle`` that cancels it. The
engine calls ``sink`` from its own thread: for a ``GenerationRequest`` (prompt token ids, sampling,
stop strings, n, constraints) ``Delta`` events (released text with its tokens) and one ``Finished``
per choice; for an ``EmbeddingRequest`` one ``Embedded`` per input; then always one ``End``
(carrying the error if the engine failed). Text is released only once it cannot be the start of a
stop string, so deltas concatenate to the final text exactly. ``sink.wait_taken`` tells the engine
when the consumer has taken what it was handed, so a step need not share the cores with it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from server.engine.fim import FimTokens

if TYPE_CHECKING:
    from server.registry import ModelConfig

FinishReason = Literal["stop", "length", "cancelled"]

# ggml block sizes: q8_0 stores 32 values in 34 bytes, q4_0 in 18.
KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# The longest an engine waits, per consumer, for what it handed over to be taken before its next
# step (await_taken): a frame costs the event loop a few hundred microseconds, and a stalled
# consumer costs this once. Measured: bench/results/2026-11-24-handover.md.
HANDOVER_WAIT_S = 0.002


def await_taken(sinks: Iterable[EventSink], threads: int) -> None:
    """Before a step on ``threads`` compute threads that fill every core: wait (bounded) until the
    consumers have taken what they were handed, so the event loop formats and sends on a free core
    instead of preempting a compute thread mid-step, where the others wait for it at the next
    barrier. A first token goes out before the next step the same way."""
    if threads < available_cores():
        return
    sinks = list(sinks)
    deadline = time.perf_counter() + HANDOVER_WAIT_S * len(sinks)
    for sink in sinks:
        sink.wait_taken(max(0.0, deadline - time.perf_counter()))


def ggml_kv_type(kv_cache: str) -> int:
    """llama.cpp's GGML_TYPE_* for a `kv_cache` setting ("f16", "q8_0", "q4_0")."""
    import llama_cpp

    return int(getattr(llama_cpp, f"GGML_TYPE_{kv_cache.upper()}"))


def open_llama(path: Path, cfg: ModelConfig, *, n_ctx: int, threads: int) -> Any:
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
    # Constraints applied per sequence by llama.cpp's samplers:
    grammar: str | None = None  # GBNF (root rule "root") every choice must match
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); -inf bans the token
    ignore_eos: bool = False  # end-of-generation tokens are banned: run to max_tokens or a stop
    # False: the caller reads the text only once the request ends (a collected answer), so the
    # engine may hand over what follows the first release in one Delta at the end.
    stream: bool = True


@dataclass(frozen=True)
class EmbeddingRequest:
    """One vector per input (token ids), pooled as the model was trained to pool."""

    inputs: list[list[int]]
    normalize: bool = True  # L2-normalise, as sentence-transformers and OpenAI do


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


@dataclass(frozen=True)
class Embedded:
    index: int  # which input
    vector: tuple[float, ...]
    tokens: int  # tokens of that input that were evaluated


@dataclass(frozen=True)
class End:
    """The last event of every submitted request; ``error`` set when the engine failed."""

    error: BaseException | None = None


Event = Delta | Finished | Embedded | End


class EventSink(Protocol):
    """Where a request's events go. The engine calls it from its own thread."""

    def __call__(self, event: Event) -> None: ...

    def wait_taken(self, timeout_s: float) -> bool:
        """Wait, at most ``timeout_s``, until the consumer has taken every event handed over so
        far (a streamed frame: written to its socket); whether it had.

        An engine whose compute threads fill every core waits here before its next step, so
        the event loop formats and sends on a free core instead of preempting a compute thread
        mid-step (where the others wait for it at their next barrier). A consumer that fell
        behind (a client that does not read) is not waited for again until it catches up."""
        ...


class CallbackSink:
    """An ``EventSink`` for a function that takes each event as it is called (tests, benches,
    in-process callers): nothing handed over is ever left to take."""

    def __init__(self, take: Callable[[Event], object]):
        self._take = take

    def __call__(self, event: Event) -> None:
        self._take(event)

    def wait_taken(self, timeout_s: float) -> bool:
        return True


Request = GenerationRequest | EmbeddingRequest


class Handle(Protocol):
    def cancel(self) -> None:
        """Stop the request as soon as possible (within one step); its End still follows."""
        ...


class CancelFlag:
    """A ``Handle`` whose cancel sets a flag the engine's thread reads between steps."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self.is_set = self._flag.is_set

    def cancel(self) -> None:
        self._flag.set()


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
    prompt_cache_bytes: int = 0  # host RAM the engine may hold for saved prompt states
    embedding: bool = False  # an embedding model: takes EmbeddingRequests only
    n_embd: int = 0  # length of the vectors an embedding model returns

    @property
    def memory_bytes(self) -> int:
        return self.size_bytes + self.kv_cache_bytes + self.prompt_cache_bytes


@dataclass(frozen=True)
class CacheStats:
    """The host-RAM prompt cache of an engine and how often it repacked its KV buffer (all zero
    for engines without them)."""

    bytes_held: int = 0
    hits: int = 0
    misses: int = 0
    kv_packs: int = 0  # times its KV cells were packed into one run per sequence


class Engine(Protocol):
    """What the scheduler asks of a model, whatever drives it (simple, batched, embedding)."""

    info: ModelInfo
    # Requests the engine serves at once; the scheduler admits up to this many and queues the
    # rest. The simple engine serves one, the batched engine one per slot.
    capacity: int
    kv_cells: int  # KV cache cells of all its sequences together

    def submit(self, request: Request, sink: EventSink) -> Handle:
        """Start a request; events go to ``sink`` from the engine's thread, ``End`` last.

        Never blocks on the model. A ``GenerationRequest`` yields ``Delta`` events and one
        ``Finished`` per choice; an ``EmbeddingRequest`` one ``Embedded`` per input.
        """
        ...

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """Token ids for text; with `special`, marker text like <|im_end|> becomes its token."""
        ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def kv_tokens(self) -> int:
        """Tokens currently held in the KV cache (read from other threads for metrics)."""
        ...

    def cache_stats(self) -> CacheStats: ...

    def cpu_threads(self) -> int:
        """CPU threads llama.cpp runs a decode step with now (fewer than configured while
        other processes keep the cores busy: server.engine.cpu_share)."""
        ...

    def close(self) -> None: ...
