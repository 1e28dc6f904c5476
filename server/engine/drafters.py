"""Drafters: cheap guesses of the next K tokens for the target model to verify.

``PromptLookup`` copies what followed an earlier occurrence of the last few tokens in the prompt
or the text generated so far (prompt-lookup / n-gram decoding): free, and right whenever the
answer repeats its input, as code edits do. ``DraftModel`` runs a smaller model with the same
vocabulary greedily; it keeps its own KV cache, rolled back to the verified tokens before each
proposal.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

from server.engine import binding
from server.engine.base import open_llama
from server.engine.model import Model
from server.errors import ModelUnavailable
from server.registry import ModelConfig

_NGRAM_MAX = 3  # longest tail looked up; longer matches are measured by extending backwards
_MATCH_CAP = 32
_CANDIDATES = 8  # recent occurrences of the n-gram compared for the best-aligned one
# Acceptance-rate keys for prompt lookup: match length buckets (longer matches copy better).
_MATCH_BUCKETS = (1, 2, 4, 8, 16)
_LOOKUP_PRIORS = {1: 0.3, 2: 0.45, 4: 0.6, 8: 0.75, 16: 0.85}


def match_bucket(match_len: int) -> int:
    """The acceptance-rate key of a prompt-lookup proposal: its match length, bucketed."""
    return max(b for b in _MATCH_BUCKETS if b <= match_len)


class PromptLookup:
    """n-gram index over one request's tokens (prompt + generated), updated as tokens arrive."""

    name = "prompt_lookup"

    def __init__(self) -> None:
        self._tokens: list[int] = []
        # n-gram -> indices of the tokens that followed its occurrences, oldest first
        self._next: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(_NGRAM_MAX + 1)]
        self._cursor: int | None = None  # where the last copy would continue

    @staticmethod
    def prior(key: Hashable) -> float:
        # Before any evidence: a long match is probably a copy, a single token probably is not.
        return _LOOKUP_PRIORS.get(key, 0.5) if isinstance(key, int) else 0.5

    def begin(self, prompt: Sequence[int]) -> None:
        self._tokens = []
        self._next = [{} for _ in range(_NGRAM_MAX + 1)]
        self._cursor = None
        self.extend(prompt)

    def extend(self, tokens: Iterable[int]) -> None:
        toks = self._tokens
        for t in tokens:
            i = len(toks)
            for n in range(1, min(_NGRAM_MAX, i) + 1):
                self._next[n].setdefault(tuple(toks[i - n : i]), []).append(i)
            toks.append(t)

    def lookup(self) -> tuple[int, int] | None:
        """(start of the proposed continuation, match length) or None when nothing matches.

        The longest n-gram that occurred before wins. Among its occurrences (the recent ones,
        and the ones just past where the last copy left off), the one whose match reaches
        furthest back wins, then the one nearest that copy cursor: a rewrite walks through its
        source in order, so after an edit the copy usually resumes right behind it."""
        toks = self._tokens
        end = len(toks)
        cursor = self._cursor
        for n in range(min(_NGRAM_MAX, end), 0, -1):
            starts = self._next[n].get(tuple(toks[-n:]))
            if not starts:
                continue
            candidates = starts[-_CANDIDATES:]
            if cursor is not None:
                i = bisect.bisect_left(starts, cursor - 1)
                candidates = candidates + starts[i : i + 2]
            best: tuple[int, int] | None = None
            best_score: tuple[int, int] = (-1, 0)
            for start in candidates:
                length = n
                while (
                    length < _MATCH_CAP
                    and start - length - 1 >= 0
                    and toks[start - length - 1] == toks[end - length - 1]
                ):
                    length += 1
                score = (length, -abs(start - cursor) if cursor is not None else start)
                if score > best_score:
                    best, best_score = (start, length), score
            return best
        return None

    def follow(self, found: tuple[int, int], accepted: int) -> None:
        """The target kept ``accepted`` proposed tokens and then one of its own, which most
        often replaces the next source token (an edit): the copy resumes after it."""
        self._cursor = found[0] + accepted + 1

    def propose(self, found: tuple[int, int], k: int) -> list[int]:
        start, _ = found
        return self._tokens[start : start + k]


def vocab_fingerprint(vocab: Any) -> tuple[int, str]:
    """(vocabulary size, sha256 over every token's text and the BOS/EOS ids) of a vocab pointer."""
    import llama_cpp

    n = llama_cpp.llama_vocab_n_tokens(vocab)
    h = hashlib.sha256()
    for t in range(n):
        h.update(llama_cpp.llama_vocab_get_text(vocab, t) or b"")
        h.update(b"\0")
    h.update(f"{llama_cpp.llama_vocab_bos(vocab)},{llama_cpp.llama_vocab_eos(vocab)}".encode())
    return n, h.hexdigest()


def _llm_vocab(llm: Any) -> Any:
    return binding.vocab_ptr(binding.weights_of(llm))


def check_same_vocabulary(
    target_name: str, target_llm: Any, draft_name: str, draft_path: Path
) -> None:
    """Refuse a draft whose tokens mean something else: its proposals would be nonsense."""
    import llama_cpp

    try:
        probe = llama_cpp.Llama(model_path=str(draft_path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise ModelUnavailable(
            f"draft model {draft_name!r} of {target_name!r}: llama.cpp could not read "
            f"{draft_path}: {e}"
        ) from e
    try:
        refuse_other_vocabulary(target_name, _llm_vocab(target_llm), draft_name, _llm_vocab(probe))
    finally:
        probe.close()


def refuse_other_vocabulary(target_name: str, target: Any, draft_name: str, draft: Any) -> None:
    """ModelUnavailable unless two vocab pointers hold the same tokens."""
    mine, theirs = vocab_fingerprint(target), vocab_fingerprint(draft)
    if mine != theirs:
        raise ModelUnavailable(
            f"model {target_name!r} cannot use {draft_name!r} as its draft: the vocabularies "
            f"differ ({target_name}: {mine[0]} tokens, sha256 {mine[1][:12]}; {draft_name}: "
            f"{theirs[0]} tokens, sha256 {theirs[1][:12]}). A draft model must share the "
            "target's tokenizer; pick one from the same family or use speculative = "
            '"prompt_lookup"'
        )


class DraftModel:
    """A second ``llama_cpp.Llama`` proposing greedily; its KV cache follows the target's text."""

    name = "draft"

    def __init__(self, llm: Any, model: Model):
        self.llm = llm
        self.model = model
        self.cfg = model.cfg
        self._n_vocab = llm.n_vocab()
        self._synced = 0  # tokens known to match the current request's history
        self.steps = 0  # tokens decoded alone (the cost model's draft steps)
        self.batched = 0  # tokens decoded in batches (catching up on the prompt or a correction)

    @classmethod
    def load(cls, path: Path, cfg: ModelConfig, n_ctx: int, threads: int) -> DraftModel:
        try:
            # n_ctx: it must hold whatever the target holds.
            llm = open_llama(path, cfg, n_ctx=n_ctx, threads=cfg.n_threads or threads)
        except (ValueError, RuntimeError) as e:
            raise ModelUnavailable(
                f"draft model {cfg.name!r}: llama.cpp could not load {path}: {e}"
            ) from e
        return cls(llm, Model.of_llama(llm, path, cfg.model_copy(update={"n_ctx": n_ctx})))

    @staticmethod
    def prior(_key: Hashable) -> float:
        return 0.7

    def begin(self) -> None:
        self._synced = 0  # a new request: its prompt may share only part of the cached text
        self.steps = self.batched = 0

    def _sync(self, history: Sequence[int]) -> None:
        """Roll the draft's cache back to the longest prefix it shares with ``history``, then
        evaluate the rest, leaving the logits of history's last token."""
        llm = self.llm
        ids = llm.input_ids
        n = min(self._synced, llm.n_tokens, len(history))
        limit = min(llm.n_tokens, len(history))
        while n < limit and ids[n] == history[n]:
            n += 1
        n = min(n, len(history) - 1)  # the last token is evaluated again for its logits
        llm.n_tokens = n  # eval() drops the cache from n_tokens on
        llm.eval(history[n:])
        if len(history) - n > 1:
            self.batched += len(history) - n
        else:
            self.steps += 1
        self._synced = llm.n_tokens

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        """k greedy tokens after ``history`` (the verified text, pending token included)."""
        self._sync(history)
        llm, out = self.llm, []
        for i in range(k):
            row = binding.llama_logits_row(llm, -1, self._n_vocab)
            out.append(int(row.argmax()))
            if i < k - 1:  # the last proposal needs no logits of its own
                llm.eval(out[-1:])
                self.steps += 1
        return out

    def timed_work(self, n: int) -> Callable[[], float]:
        """Calibration work: one pass over n tokens past the cached text, then undone."""

        def work() -> float:
            llm = self.llm
            base = llm.n_tokens
            llm.eval([max(llm.token_bos(), 0)] * n)
            llm.n_tokens = base
            binding.llama_seq_rm(llm, base)
            self._synced = min(self._synced, base)
            return n

        return work

    def close(self) -> None:
        self.llm.close()
