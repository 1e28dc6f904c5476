"""OpenAI request fields (and the llama-server extras it accepts) → the core's request types."""

from __future__ import annotations

from server.api.openai.protocol import _SamplingFields
from server.engine.base import SamplingParams, Speculation


def speculation(body: _SamplingFields) -> Speculation:
    return Speculation(mode=body.speculative, max_draft=body.speculative_max_draft)


def time_budget(body: _SamplingFields) -> float | None:
    return body.t_max_predict_ms / 1e3 if body.t_max_predict_ms else None


def sampling_params(body: _SamplingFields) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=body.seed,
    )
