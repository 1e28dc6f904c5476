"""Per-token pieces both engines share: llama.cpp sampler chains and OpenAI logprob entries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from server.engine.base import GenerationRequest, TokenLogprob
from server.errors import InvalidRequest

if TYPE_CHECKING:
    from server.engine.model import Model


def sampler_chain(req: GenerationRequest, seed: int, model: Model) -> Any:
    """A llama.cpp sampler chain for one sequence of a request: its logit biases (and the ban on
    end-of-generation tokens for ``ignore_eos``), penalties, grammar, then greedy or the sampling
    steps ``Llama`` uses. The caller owns it and frees it with ``llama_sampler_free``.

    Raises InvalidRequest when the grammar does not parse (llama.cpp answers NULL).
    """
    import llama_cpp

    s = req.sampling
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    biases = logit_biases(req, model)
    if biases:
        arr: Any = (llama_cpp.llama_logit_bias * len(biases))()
        for i, (token, bias) in enumerate(biases.items()):
            arr[i].token, arr[i].bias = token, bias
        add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(biases), arr))
    add(
        llama_cpp.llama_sampler_init_penalties(
            model.n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
        )
    )
    if req.grammar is not None:
        grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, req.grammar.encode(), b"root")
        if not grammar:
            llama_cpp.llama_sampler_free(chain)
            raise InvalidRequest(
                "the grammar does not parse (GBNF, root rule `root`)", param="grammar"
            )
        add(grammar)
    if s.temperature == 0:
        add(llama_cpp.llama_sampler_init_greedy())
    else:
        add(llama_cpp.llama_sampler_init_top_k(s.top_k))
        add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(s.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


def logit_biases(req: GenerationRequest, model: Model) -> dict[int, float]:
    """The request's logit biases, with ``ignore_eos``'s ban on end-of-generation tokens."""
    biases = dict(req.logit_bias)
    if req.ignore_eos:
        biases.update((t, float("-inf")) for t in model.eog_tokens())
    return biases


def greedy_bans(req: GenerationRequest, model: Model) -> frozenset[int] | None:
    """The tokens banned from a request whose chain (``sampler_chain``) picks the highest raw
    logit among the others: greedy, with nothing editing the logits but bans (``ignore_eos``'s
    end tokens, biases of -inf). None when the chain does more (finite biases, penalties, a
    grammar, sampling).

    Then an argmax over the logits row, the banned tokens masked, is the same token for a
    fraction of the cost: llama.cpp's sampler copies every logit into a candidate array before
    its greedy step scans it, and both take the first of equal maxima."""
    s = req.sampling
    if not (
        s.temperature == 0
        and req.grammar is None
        and s.repeat_penalty == 1.0
        and s.frequency_penalty == 0.0
        and s.presence_penalty == 0.0
    ):
        return None
    biases = logit_biases(req, model)
    if any(bias != float("-inf") for bias in biases.values()):
        return None
    return frozenset(biases)


def greedy_pick(row: np.ndarray, banned: frozenset[int]) -> int:
    """The first highest logit of ``row`` outside ``banned``."""
    token = int(row.argmax())
    if token in banned:
        row = row.copy()
        row[list(banned)] = -np.inf
        token = int(row.argmax())
    return token


# llama.cpp's llama_token_data {id, logit, p}, as numpy lays out the same C struct.
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


def sample_row(sampler: Any, row: np.ndarray) -> int:
    """What ``llama_sampler_sample`` does with a context's logits row, for a row kept apart from
    any context: the chain applied to every token's logit, then told which token it picked (so
    penalties and grammars move on). ``row`` is not written."""
    import ctypes

    import llama_cpp

    data = np.empty(len(row), dtype=_TOKEN_DATA)
    data["id"] = np.arange(len(row), dtype=np.intc)
    data["logit"] = row
    data["p"] = 0.0
    cur = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
        size=len(row),
        selected=-1,
        sorted=False,
    )
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cur))
    token = int(cur.data[cur.selected].id)  # samplers may reorder the array in place
    llama_cpp.llama_sampler_accept(sampler, token)
    return token


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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
