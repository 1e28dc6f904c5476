"""A token's logits do not depend on how many threads computed them.

codeserve's llama.cpp gives each thread one contiguous share of a weight matrix's rows when a
single token is decoded (patches/llama-cpp-python-0.3.36/0004-ggml-cpu-single-token-rows-by-
thread.patch for ggml's per-row path, and 0003's Q4_1 kernel): each output is still one row's dot
product, computed the same way whichever thread takes it. A split that skipped a row, took one
twice or ran past the matrix leaves some output unset or overwritten, and that token's logits
then differ between thread counts whose shares end at different rows. Five threads split the
default model's 192-, 576-, 1,536- and 49,152-row matrices unevenly, which also takes Q4_1's
tiles of 4 rows through their shorter last tile.
"""

from __future__ import annotations

import numpy as np
from llama_cpp import Llama

TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n"


def _scores_one_at_a_time(model_path, threads: int) -> np.ndarray:
    llm = Llama(
        str(model_path),
        n_ctx=128,
        n_batch=32,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        flash_attn=True,
        verbose=False,
    )
    try:
        tokens = llm.tokenize(TEXT.encode())[:16]
        for t in tokens:
            llm.eval([t])
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()


def test_a_tokens_logits_are_the_same_on_any_number_of_threads(model_path):
    one = _scores_one_at_a_time(model_path, 1)
    assert np.isfinite(one).all()
    for threads in (2, 3, 5):
        split = _scores_one_at_a_time(model_path, threads)
        assert np.array_equal(split, one), (threads, float(np.abs(split - one).max()))
