"""A Q4_1 model's logits for a token do not depend on how many tokens were evaluated with it.

codeserve's llama.cpp carries a tiled Q4_1 matmul for AVX2
(patches/llama-cpp-python-0.3.36/0003-ggml-cpu-q4_1-tiled-matmul.patch): tiles of up to 4 weight
rows by 2 tokens for batches of two tokens or more, tiles of 4 rows for a single token, each
output computed with the operations of llama.cpp's per-row dot product, in the same order. A tile
that summed, scaled or rounded differently, or put an output in another's place, changes some
token's logits against the same token evaluated alone; so does speculation's verification, which
the engine's tests hold token for token to plain greedy decoding. (That both paths also match
llama.cpp's unpatched per-row kernel was checked against a build of it: the logits' hashes in
bench/results/2026-11-24-q4_1-decode-tiles.md.)
"""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import Llama

TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(fibonacci(10))\n"
)


@pytest.fixture(scope="module")
def llm(model_path) -> Llama:
    return Llama(
        str(model_path),
        n_ctx=256,
        n_batch=64,
        n_threads=2,
        logits_all=True,
        flash_attn=True,
        verbose=False,
    )


def _scores(llm: Llama, tokens: list[int], chunks: list[int]) -> np.ndarray:
    assert sum(chunks) == len(tokens)
    llm.reset()
    start = 0
    for n in chunks:
        llm.eval(tokens[start : start + n])
        start += n
    return np.array(llm.scores[: len(tokens)])


# Batches under 64 tokens (GGML_FA_TILE_Q): from there llama.cpp's flash attention over an F16
# KV cache takes a tiled path of its own, which this test is not about. Odd sizes leave tiles of
# one token.
@pytest.mark.parametrize(
    "chunks",
    [[27], [9, 7, 5, 6], [3, 1, 2, 21], [13, 14]],
    ids=["one-batch", "odd-sizes", "small-then-large", "two-halves"],
)
def test_a_tokens_logits_are_the_same_alone_and_in_any_batch(llm, chunks):
    tokens = llm.tokenize(TEXT.encode())[:27]
    assert len(tokens) == 27
    alone = _scores(llm, tokens, [1] * len(tokens))
    together = _scores(llm, tokens, chunks)
    assert np.array_equal(together, alone), float(np.abs(together - alone).max())
