"""llama-server's answer shapes: the final result, stream chunks, timings, generation settings.

Field for field what llama-server's ``to_json_non_oaicompat`` writes. Where codeserve cannot know
a value llama-server reports, the module says so: ``id_slot`` is -1 (the engine does not expose
slot identities), and ``stop_type`` tells "word" from "eos" by whether the engine held back
tokens (a stop string's) — a stop string that starts and ends inside one token reads as "eos".
A choice that ``n_indent`` or ``t_max_predict_ms`` ended reports ``cache_n`` 0: the engine's
own figures for it are not known (see ``server.core.line_rules``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.api.llamacpp.protocol import GenerationFields
from server.api.relay import Choice
from server.engine.base import Delta, Finished, SamplingParams, TokenLogprob


def timings(f: Finished | None) -> dict[str, Any]:
    if f is None:
        return {}
    t = f.timings
    prompt_n = t.prompt_tokens - t.cached_tokens
    return {
        "cache_n": t.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": t.prompt_ms,
        "prompt_per_token_ms": t.prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n * 1e3 / t.prompt_ms if t.prompt_ms else 0.0,
        "predicted_n": t.completion_tokens,
        "predicted_ms": t.decode_ms,
        "predicted_per_token_ms": t.decode_ms / t.completion_tokens if t.completion_tokens else 0.0,
        "predicted_per_second": t.completion_tokens * 1e3 / t.decode_ms if t.decode_ms else 0.0,
    }


def probabilities(
    ids: list[int] | tuple[int, ...], entries: list[TokenLogprob]
) -> list[dict[str, Any]]:
    """``completion_probabilities`` (pre-sampling log-probabilities, post_sampling_probs false).

    The alternatives carry no ``id``: the engine reports them by text.
    """
    return [
        {
            "id": tok,
            "token": e.token,
            "bytes": list(e.token.encode()),
            "logprob": e.logprob,
            "top_logprobs": [
                {"token": text, "bytes": list(text.encode()), "logprob": lp}
                for text, lp in e.top.items()
            ],
        }
        for tok, e in zip(ids, entries, strict=False)
    ]


def stop_type(f: Finished | None, released_tokens: int, stops: list[str]) -> tuple[str, str]:
    """llama-server's (stop_type, stopping_word) for a finished choice."""
    if f is None or f.reason == "cancelled":
        return "none", ""
    if f.reason == "length":
        return "limit", ""
    if stops and f.timings.completion_tokens > released_tokens:
        return "word", stops[0] if len(stops) == 1 else ""
    return "eos", ""


def pick(paths: list[str], obj: dict[str, Any]) -> dict[str, Any]:
    """llama-server's ``response_fields``: only these values, keyed by their "a/b" paths."""
    out: dict[str, Any] = {}
    for path in paths:
        node: Any = obj
        for part in path.split("/"):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            out[path] = node
    return out


@dataclass
class Answer:
    """What every result of one request shares, and the running counts of a stream."""

    body: GenerationFields
    model: str
    prompt_ids: list[int]
    prompt_text: str
    sampling: SamplingParams
    samplers: list[str]
    n_predict: int
    bias: tuple[tuple[int, float], ...] = ()
    _predicted: dict[int, int] = field(default_factory=dict)
    _new_line: dict[int, bool] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        s, b = self.sampling, self.body
        return {
            "n_predict": self.n_predict,
            "max_tokens": self.n_predict,
            "seed": s.seed if s.seed is not None else 0xFFFFFFFF,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": s.min_p,
            "repeat_last_n": b.repeat_last_n,
            "repeat_penalty": s.repeat_penalty,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "dynatemp_range": 0.0,
            "typical_p": 1.0,
            "xtc_probability": 0.0,
            "dry_multiplier": 0.0,
            "top_n_sigma": -1.0,
            "mirostat": 0,
            "stop": b.stop,
            "n_keep": 0,
            "ignore_eos": b.ignore_eos,
            "stream": b.stream,
            # JSON has no -inf: a banned token shows as null, as llama-server writes it.
            "logit_bias": [
                {"bias": v if v != float("-inf") else None, "token": t} for t, v in self.bias
            ],
            "n_probs": b.n_probs,
            "min_keep": b.min_keep,
            "grammar": b.grammar or "",
            "samplers": self.samplers,
            "n_indent": b.n_indent,
            "t_max_predict_ms": b.t_max_predict_ms,
            "timings_per_token": False,
            "post_sampling_probs": False,
            "lora": [],
        }

    def partial(self, d: Delta) -> dict[str, Any]:
        n = self._predicted[d.index] = self._predicted.get(d.index, 0) + len(d.token_ids)
        self._new_line[d.index] = self._new_line.get(d.index, False) or "\n" in d.text
        out: dict[str, Any] = {
            "index": d.index,
            "content": d.text,
            "tokens": list(d.token_ids),
            "stop": False,
            "id_slot": -1,
            "tokens_predicted": n,
            "tokens_evaluated": len(self.prompt_ids),
        }
        if self.body.n_probs > 0:
            out["completion_probabilities"] = probabilities(d.token_ids, list(d.logprobs))
        return out

    def final_chunk(self, f: Finished) -> dict[str, Any]:
        released = self._predicted.get(f.index, 0)
        out = self._final(f.index, "", [], f, released, self._new_line.get(f.index, False))
        return out if not self.body.response_fields else pick(self.body.response_fields, out)

    def final(self, index: int, c: Choice) -> dict[str, Any]:
        out = self._final(index, c.text, c.token_ids, c.finish, len(c.token_ids), "\n" in c.text)
        if self.body.n_probs > 0 and not self.body.response_fields:
            out["completion_probabilities"] = probabilities(c.token_ids, c.logprobs)
        return out if not self.body.response_fields else pick(self.body.response_fields, out)

    def _final(
        self,
        index: int,
        content: str,
        ids: list[int],
        f: Finished | None,
        released: int,
        new_line: bool,
    ) -> dict[str, Any]:
        predicted = f.timings.completion_tokens if f is not None else released
        kind, word = stop_type(f, released, self.body.stop)
        return {
            "index": index,
            "content": content,
            "tokens": ids if self.body.return_tokens else [],
            "id_slot": -1,
            "stop": True,
            "model": self.model,
            "tokens_predicted": predicted,
            "tokens_evaluated": len(self.prompt_ids),
            "generation_settings": self.settings(),
            "prompt": self.prompt_text,
            "has_new_line": new_line,
            "truncated": False,
            "stop_type": kind,
            "stopping_word": word,
            "tokens_cached": len(self.prompt_ids) + predicted,
            "timings": timings(f),
        }
