"""Greedy decoding's shortcut: an argmax over the logits row instead of llama.cpp's sampler chain,
taken only when that chain could pick nothing else (server.engine.sampling.greedy_bans)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from server.engine.base import GenerationRequest, SamplingParams
from server.engine.model import Model
from server.engine.sampling import greedy_bans, greedy_pick, sampler_chain
from tests.conftest import batch_context

GREEDY = GenerationRequest([1, 2], 8, sampling=SamplingParams(temperature=0))


class Vocab:
    def eog_tokens(self) -> tuple[int, ...]:
        return (2, 7)


@pytest.mark.parametrize(
    "change",
    [
        {"sampling": SamplingParams(temperature=0.7)},
        {"sampling": SamplingParams(temperature=0, repeat_penalty=1.1)},
        {"sampling": SamplingParams(temperature=0, frequency_penalty=0.5)},
        {"sampling": SamplingParams(temperature=0, presence_penalty=0.5)},
        {"logit_bias": ((5, 0.0),)},
        {"logit_bias": ((5, float("-inf")), (6, 2.0))},
        {"grammar": 'root ::= "a"'},
    ],
)
def test_anything_that_edits_the_logits_keeps_the_sampler_chain(change):
    assert greedy_bans(GREEDY, Vocab()) == frozenset()  # type: ignore[arg-type]
    assert greedy_bans(dataclasses.replace(GREEDY, **change), Vocab()) is None  # type: ignore[arg-type]


def test_bans_alone_keep_the_argmax_with_the_banned_tokens_masked():
    req = dataclasses.replace(GREEDY, ignore_eos=True, logit_bias=((5, float("-inf")),))
    banned = greedy_bans(req, Vocab())  # type: ignore[arg-type]
    assert banned == {2, 5, 7}
    row = np.array([0.0, 1.0, 9.0, 3.0, 3.0, 8.0, 1.0, 9.0], dtype=np.float32)
    assert greedy_pick(row, banned) == 3  # the first of the equal maxima left
    assert row[2] == 9.0  # the logits themselves are untouched
    assert greedy_pick(row, frozenset()) == 2


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
            # Banned: the end tokens, and the top pick of the first step (a -inf bias).
            ctx.seq_rm(0, -1, -1)
            ctx.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
            top = int(np.argmax(ctx.logits(len(prompt) - 1, model.n_vocab)))
            for req in (
                dataclasses.replace(GREEDY, prompt=prompt),
                dataclasses.replace(
                    GREEDY, prompt=prompt, ignore_eos=True, logit_bias=((top, float("-inf")),)
                ),
            ):
                banned = greedy_bans(req, model)
                assert banned is not None
                chain = sampler_chain(req, 0, model)
                ctx.seq_rm(0, len(prompt) - 1, -1)
                ctx.decode([(prompt[-1], len(prompt) - 1, 0, True)])
                row, pos = 0, len(prompt)
                try:
                    for _ in range(48):
                        fast = greedy_pick(ctx.logits(row, model.n_vocab), banned)
                        assert int(llama_cpp.llama_sampler_sample(chain, ctx.ptr, row)) == fast
                        assert fast not in banned
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
