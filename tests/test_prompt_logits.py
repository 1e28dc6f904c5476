"""A prompt sent again starts from the logits kept after its last evaluation, without a step.

The bound and the copy are pure logic; sampling a kept row runs llama.cpp's own sampler chains on
the real model, token for token against sampling the context's row; over HTTP, a repeated prompt
gives the same tokens and logprobs as its first time and evaluates none of its tokens.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import llama_cpp
import numpy as np
import pytest

from server.engine.base import GenerationRequest, SamplingParams
from server.engine.model import Model
from server.engine.prompt_logits import PromptLogits
from server.engine.sampling import sample_row, sampler_chain
from tests.conftest import batch_context
from tests.test_metrics import scrape, value

# -- the kept rows ------------------------------------------------------------------------------


def test_rows_are_kept_by_whole_prompt_within_the_byte_bound():
    rows = PromptLogits(max_bytes=3 * 400)  # three rows of 100 float32
    for i in range(5):
        rows.put([1, 2, i], np.full(100, i, dtype=np.float32))
    assert len(rows) == 3 and rows.bytes_held == 1200
    assert rows.get([1, 2, 0]) is None and rows.get([1, 2, 1]) is None  # oldest out first
    assert rows.get([1, 2]) is None  # a prefix is another prompt
    assert rows.get([1, 2, 2]) is not None  # now the most recently used
    rows.put([9], np.zeros(100, dtype=np.float32))
    assert rows.get([1, 2, 3]) is None and rows.get([1, 2, 2]) is not None
    rows.put([1, 2, 4], np.zeros(100, dtype=np.float32))  # kept already: only used again
    rows.put([8], np.zeros(100, dtype=np.float32))
    assert rows.get([9]) is None and rows.get([1, 2, 4]) is not None and len(rows) == 3


def test_a_kept_row_is_a_read_only_copy():
    rows = PromptLogits()
    source = np.arange(10, dtype=np.float32)
    rows.put([1], source)
    source[:] = -1  # the context's buffer is overwritten by the next decode
    kept = rows.get([1])
    assert kept is not None and kept[3] == 3
    with pytest.raises(ValueError):
        kept[0] = 5
    small = PromptLogits(max_bytes=10)
    small.put([1], source)  # bigger than the bound: not kept
    assert len(small) == 0 and small.bytes_held == 0


# -- llama.cpp's sampler chains on a kept row ---------------------------------------------------

CHAINS = {
    "greedy": SamplingParams(temperature=0),
    "sampled": SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02),
    "penalties": SamplingParams(temperature=0.7, repeat_penalty=1.3, presence_penalty=0.5),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_a_chain_samples_a_kept_row_as_it_samples_the_contexts(model_path, registry, name):
    cfg = registry.models["smollm2-135m"].model_copy(update={"n_ctx": 256})
    model = Model.load(model_path, cfg)
    ctx = batch_context(model, n_ctx=256, n_seq=1)
    req = GenerationRequest([], 16, sampling=CHAINS[name])
    on_ctx, on_row = sampler_chain(req, 7, model), sampler_chain(req, 7, model)
    try:
        tokens = model.tokenize("def quicksort(items):\n", add_bos=True)
        ctx.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        picked: list[tuple[int, int]] = []
        for step in range(12):
            row = ctx.logits(-1, model.n_vocab).copy()  # -1: the last row with logits
            a = int(llama_cpp.llama_sampler_sample(on_ctx, ctx.ptr, -1))
            b = sample_row(on_row, row)
            picked.append((a, b))
            ctx.decode([(a, len(tokens) + step, 0, True)])
        assert all(a == b for a, b in picked), picked
        assert len({a for a, _ in picked}) > 1
    finally:
        llama_cpp.llama_sampler_free(on_ctx)
        llama_cpp.llama_sampler_free(on_row)
        ctx.close()
        model.close()


# -- over HTTP ----------------------------------------------------------------------------------


def _evaluated(client: httpx.Client) -> tuple[float, float]:
    s = scrape(client)
    model = "smollm2-135m"
    return (
        value(s, "llamacpp:prompt_tokens_total", model=model),
        value(s, "llamacpp:prompt_tokens_cached_total", model=model),
    )


def test_a_repeated_prompt_evaluates_nothing_and_answers_the_same(client):
    body = {
        "model": "smollm2-135m",
        "prompt": "# Merge two sorted lists into one sorted list\ndef merge(a, b):\n",
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": 3,
    }
    first = client.post("/v1/completions", json=body).json()
    before = _evaluated(client)
    again = client.post("/v1/completions", json=body).json()
    after = _evaluated(client)
    prompt_tokens = again["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt_tokens
    assert after[0] == before[0]  # not one prompt token evaluated
    assert after[1] - before[1] == prompt_tokens
    # The first token comes from the very row the first request sampled: same token, same logprobs.
    a, b = first["choices"][0]["logprobs"], again["choices"][0]["logprobs"]
    assert a["tokens"][0] == b["tokens"][0]
    assert a["top_logprobs"][0] == b["top_logprobs"][0]
    assert first["choices"][0]["text"] == again["choices"][0]["text"]


def test_repeats_of_a_prompt_streamed_sampled_and_with_n_choices(client):
    body = {"model": "smollm2-135m", "prompt": "def is_even(n):\n", "max_tokens": 12}
    client.post("/v1/completions", json={**body, "temperature": 0})
    # Sampled, several choices, while other requests come and go: every answer well formed.
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda i: client.post(
                    "/v1/completions", json={**body, "temperature": 0.9, "n": 1 + i % 3}
                ),
                range(8),
            )
        )
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert len(choices) == 1 + i % 3
        assert all(c["finish_reason"] in ("stop", "length") for c in choices)
    texts = [c["text"] for r in answers for c in r.json()["choices"]]
    assert len(set(texts)) > 1  # sampled from the kept row, not one fixed answer
    streamed = ""
    with client.stream(
        "POST", "/v1/completions", json={**body, "temperature": 0, "stream": True}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0]["text"]
    plain = client.post("/v1/completions", json={**body, "temperature": 0}).json()
    assert streamed == plain["choices"][0]["text"]
