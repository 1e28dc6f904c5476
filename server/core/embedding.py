"""Embedding inputs as token ids, whichever dialect asked: tokenized, checked, truncated if asked.

A text is tokenized with the model's frame (BERT: ``[CLS] ... [SEP]``), as sentence-transformers
does. Token ids are taken as the model's whole input, frame included, so the ids ``/tokenize``
gives for a text embed exactly like the text. An input longer than the context is refused, or
with ``truncate`` cut to the context, keeping a text's closing frame token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.base import Embedded, Engine
from server.errors import ContextOverflow, InvalidRequest

Inputs = Sequence[str | Sequence[int]]


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[tuple[float, ...]]  # in input order
    prompt_tokens: int  # tokens evaluated, over all inputs


def token_inputs(
    engine: Engine, inputs: Inputs, *, truncate: bool, param: str, n_ctx: int | None = None
) -> list[list[int]]:
    """Each input as token ids for ``engine`` (call off the event loop: tokenizing costs CPU).

    ``n_ctx`` bounds the tokens per input below the model's context (Ollama's num_ctx).
    """
    n_vocab = engine.info.n_vocab
    n_ctx = min(n_ctx or engine.info.n_ctx, engine.info.n_ctx)
    frame = engine.tokenize("", add_bos=True)
    # A frame of two tokens (BERT's [CLS] [SEP]) closes every text: truncation must keep it.
    closing = frame[-1:] if len(frame) == 2 else []
    out: list[list[int]] = []
    for i, item in enumerate(inputs):
        where = f"{param}[{i}]" if len(inputs) > 1 else param
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"{where} is an empty string", param=param)
            tokens = engine.tokenize(item, add_bos=True)
        else:
            tokens = list(item)
            if not tokens:
                raise InvalidRequest(f"{where} is an empty list of token ids", param=param)
            if min(tokens) < 0 or max(tokens) >= n_vocab:
                raise InvalidRequest(f"{where}: token ids must be in [0, {n_vocab})", param=param)
        if len(tokens) > n_ctx:
            if not truncate:
                raise ContextOverflow(
                    f"{where} has {len(tokens)} tokens, more than the {n_ctx} tokens this "
                    "model takes per input; shorten it",
                    param=param,
                )
            keep = closing if isinstance(item, str) else []
            tokens = tokens[: n_ctx - len(keep)] + keep
        out.append(tokens)
    return out


def gather(events: Sequence[Embedded], n_inputs: int) -> EmbeddingResult:
    """Vectors in input order from the engine's events (which may come in any order)."""
    vectors: list[tuple[float, ...] | None] = [None] * n_inputs
    for ev in events:
        vectors[ev.index] = ev.vector
    missing = [i for i, v in enumerate(vectors) if v is None]
    if missing:
        raise RuntimeError(f"the engine returned no vector for inputs {missing}")
    return EmbeddingResult(
        vectors=[v for v in vectors if v is not None],
        prompt_tokens=sum(ev.tokens for ev in events),
    )
