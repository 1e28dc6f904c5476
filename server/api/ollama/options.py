"""Ollama's ``options`` map → the core's sampling parameters, or a 400 naming ``options.X``.

Every option that changes the answer is honoured or refused. Defaults are Ollama's own
(temperature 0.8, top_p 0.9, top_k 40, min_p 0, repeat_last_n 64), since Ollama clients expect
them. Options that only tune speed or memory placement in Ollama's runner (threads, GPU layers,
batch size, mmap, ...) do not change the answer and are accepted without effect: codeserve
takes those from models.toml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engine.base import SamplingParams
from server.errors import InvalidRequest, Unsupported

# The repetition window llama.cpp's penalties sampler is built with (server/engine/sampling.py).
ENGINE_REPEAT_LAST_N = 64

PERFORMANCE_ONLY = frozenset(
    {
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "logits_all",
        "embedding_only",
        "draft_num_predict",
        "num_keep",  # what a context shift keeps; codeserve never shifts (see options.shift)
        "penalize_newline",  # dropped by Ollama itself: accepted and ignored there too
    }
)

_INT = ("num_predict", "top_k", "seed", "num_ctx", "repeat_last_n", "mirostat")
_FLOAT = (
    "temperature",
    "top_p",
    "min_p",
    "typical_p",
    "tfs_z",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "mirostat_tau",
    "mirostat_eta",
)
KNOWN = frozenset({*_INT, *_FLOAT, "stop", *PERFORMANCE_ONLY})


@dataclass(frozen=True)
class Options:
    sampling: SamplingParams
    stop: tuple[str, ...]
    num_predict: int | None  # None: until the context is full (Ollama's -1, -2, 0)
    num_ctx: int | None


def _number(key: str, value: Any, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(
            f"options.{key} must be of type {'integer' if kind is int else 'number'}",
            param=f"options.{key}",
        )
    if kind is int:
        if value != int(value):
            raise InvalidRequest(f"options.{key} must be an integer", param=f"options.{key}")
        return int(value)
    return float(value)


def _refuse(key: str, why: str) -> Unsupported:
    return Unsupported(f"options.{key}: {why}", param=f"options.{key}")


def parse_options(raw: dict[str, Any] | None, n_ctx: int) -> Options:
    raw = {k: v for k, v in (raw or {}).items() if v is not None}
    unknown = sorted(set(raw) - KNOWN)
    if unknown:
        raise _refuse(
            unknown[0],
            f"unknown option; supported: {', '.join(sorted(KNOWN - PERFORMANCE_ONLY))}",
        )
    o: dict[str, Any] = {}
    for key in _INT:
        if key in raw:
            o[key] = _number(key, raw[key], int)
    for key in _FLOAT:
        if key in raw:
            o[key] = _number(key, raw[key], float)

    stop = raw.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("options.stop must be an array of strings", param="options.stop")

    if o.get("mirostat", 0) != 0:
        raise _refuse("mirostat", "Mirostat sampling is not supported; use 0")
    if o.get("typical_p", 1.0) != 1.0:
        raise _refuse("typical_p", "locally typical sampling is not supported; use 1.0")
    if o.get("tfs_z", 1.0) != 1.0:
        raise _refuse("tfs_z", "tail-free sampling is not supported; use 1.0")

    temperature = o.get("temperature", 0.8)
    top_p = o.get("top_p", 0.9)
    top_k = o.get("top_k", 40)
    min_p = o.get("min_p", 0.0)
    repeat_penalty = o.get("repeat_penalty", 1.0)
    presence = o.get("presence_penalty", 0.0)
    frequency = o.get("frequency_penalty", 0.0)
    checks = (
        ("temperature", temperature >= 0, "must be >= 0"),
        ("top_p", 0 < top_p <= 1, "must be in (0, 1]"),
        ("top_k", top_k >= 0, "must be >= 0"),
        ("min_p", 0 <= min_p <= 1, "must be in [0, 1]"),
        ("repeat_penalty", repeat_penalty > 0, "must be > 0"),
    )
    for key, ok, why in checks:
        if not ok:
            raise InvalidRequest(f"options.{key} {why}", param=f"options.{key}")
    penalised = repeat_penalty != 1.0 or presence != 0.0 or frequency != 0.0
    last_n = o.get("repeat_last_n", ENGINE_REPEAT_LAST_N)
    if penalised and last_n != ENGINE_REPEAT_LAST_N:
        raise _refuse(
            "repeat_last_n",
            f"repetition penalties look back {ENGINE_REPEAT_LAST_N} tokens here; "
            f"use {ENGINE_REPEAT_LAST_N} (Ollama's default)",
        )

    num_ctx = o.get("num_ctx")
    if num_ctx is not None:
        if num_ctx <= 0:
            raise InvalidRequest("options.num_ctx must be > 0", param="options.num_ctx")
        if num_ctx > n_ctx:
            raise _refuse(
                "num_ctx",
                f"this model is loaded with a {n_ctx}-token context (n_ctx in models.toml); "
                f"ask for at most {n_ctx}",
            )
    num_predict = o.get("num_predict")
    seed = o.get("seed")
    return Options(
        sampling=SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency,
            presence_penalty=presence,
            seed=None if seed is None or seed < 0 else seed,
        ),
        stop=tuple(s for s in stop if s),
        num_predict=num_predict if num_predict is not None and num_predict > 0 else None,
        num_ctx=num_ctx,
    )
