"""Per-token pieces both engines share: llama.cpp sampler chains and OpenAI logprob entries."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from server.engine.base import SamplingParams, TokenLogprob


def sampler_chain(s: SamplingParams, seed: int, n_vocab: int):
    """A llama.cpp sampler chain for one sequence, as llama-cpp-python's `Llama` builds it.

    The caller owns it and frees it with ``llama_sampler_free``.
    """
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    add(
        llama_cpp.llama_sampler_init_penalties(
            n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
        )
    )
    if s.temperature == 0:
        add(llama_cpp.llama_sampler_init_greedy())
    else:
        add(llama_cpp.llama_sampler_init_top_k(s.top_k))
        add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(s.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


def logprob_entry(
    row: np.ndarray, token: int, top_n: int, detokenize: Callable[[list[int]], str]
) -> TokenLogprob:
    """OpenAI logprobs for one sampled token from its row of raw logits."""
    m = float(row.max())
    logz = m + float(np.log(np.exp(row - m).sum()))
    top: dict[str, float] = {}
    if top_n > 0:
        for t in np.argpartition(-row, top_n)[:top_n]:
            top[detokenize([int(t)])] = float(row[t]) - logz
    return TokenLogprob(
        token=detokenize([token]),
        logprob=float(row[token]) - logz,
        top=dict(sorted(top.items(), key=lambda kv: -kv[1])),
        text_offset=0,
    )


def common_prefix(a, b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
