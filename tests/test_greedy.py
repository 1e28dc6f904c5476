"""Greedy decoding's shortcut: an argmax over the logits row instead of llama.cpp's sampler chain,
taken only when that chain could pick nothing else (server.engine.sampling.plain_greedy)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from server.engine.base import GenerationRequest, SamplingParams
from server.engine.model import Model
from server.engine.sampling import plain_greedy, sampler_chain
from tests.conftest import batch_context

GREEDY = GenerationRequest([1, 2], 8, sampling=SamplingParams(temperature=0))


@pytest.mark.parametrize(
    "change",
    [
        {"sampling": SamplingParams(temperature=0.7)},
        {"sampling": SamplingParams(temperature=0, repeat_penalty=1.1)},
        {"sampling": SamplingParams(temperature=0, frequency_penalty=0.5)},
        {"sampling": SamplingParams(temperature=0, presence_penalty=0.5)},
        {"logit_bias": ((5, 0.0),)},
        {"ignore_eos": True},
        {"grammar": 'root ::= "a"'},
    ],
)
def test_anything_that_edits_the_logits_keeps_the_sampler_chain(change):
    assert plain_greedy(GREEDY)
    assert not plain_greedy(dataclasses.replace(GREEDY, **change))


def test_argmax_is_llama_cpps_greedy_pick(model_path, registry):
    # Token by token along three greedy continuations: the chain the request would otherwise
    # use (penalties at their neutral values, then greedy) picks exactly the argmax.
    import llama_cpp

    cfg = registry.models["smollm2-135m"]
    model = Model.load(model_path, cfg)
    ctx = batch_context(model, n_ctx=1024, n_seq=1)
    try:
        for text in ("def quicksort(xs):\n", "import json\n\n", "The capital of France is"):
            prompt = model.tokenize(text, add_bos=True)
            req = dataclasses.replace(GREEDY, prompt=prompt)
            chain = sampler_chain(req, 0, model)
            ctx.seq_rm(0, -1, -1)
            ctx.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
            row, pos = len(prompt) - 1, len(prompt)
            try:
                for _ in range(48):
                    fast = int(np.argmax(ctx.logits(row, model.n_vocab)))
                    assert int(llama_cpp.llama_sampler_sample(chain, ctx.ptr, row)) == fast
                    ctx.decode([(fast, pos, 0, True)])
                    row, pos = 0, pos + 1
            finally:
                llama_cpp.llama_sampler_free(chain)
    finally:
        ctx.close()
        model.close()


def test_greedy_text_is_the_same_through_the_chain(openai_client):
    # A zero bias changes no logit but keeps the request on llama.cpp's sampler chain.
    body = {
        "model": "smollm2-135m",
        "prompt": "def merge_sorted(a, b):\n",
        "max_tokens": 64,
        "temperature": 0,
    }
    fast = openai_client.completions.create(**body)
    chain = openai_client.completions.create(**body, logit_bias={"13": 0})
    assert fast.choices[0].text
    assert fast.choices[0].text == chain.choices[0].text
    assert fast.choices[0].finish_reason == chain.choices[0].finish_reason
