"""llama-server's native request shapes (/completion, /infill, /tokenize, /detokenize).

Defaults are llama-server's own, so a client that leaves a field out gets what llama-server would
have given it. Unknown fields are ignored, as llama-server ignores them (Tabby sends
``penalty_last_n``, llama.vscode a chunk's ``time``); fields that would change the answer are
either honoured or refused in ``params``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from server.api.wire import StrictRequest, one_prompt

MAX_STOP = 64


class _Request(StrictRequest):
    """Strict like the other dialects: `add_special: 0.0` is not a boolean."""


class GenerationFields(_Request):
    model: str | None = None
    n_predict: int | None = Field(None, ge=-1)  # -1: until the context is full
    max_tokens: int | None = Field(None, ge=-1)  # accepted by llama-server when n_predict is absent
    stream: bool = False
    stop: list[str] = Field(default_factory=list)
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    repeat_last_n: int = Field(64, ge=-1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1  # -1 (or 0xFFFFFFFF): a random seed
    min_keep: int = Field(0, ge=0)
    n_probs: int = Field(0, ge=0, le=20)
    post_sampling_probs: bool = False
    ignore_eos: bool = False
    logit_bias: list[Any] | dict[str, Any] | None = None
    samplers: list[str] | str | None = None
    n_cmpl: int | None = Field(None, ge=1, le=128)  # several completions of one prompt
    n: int | None = Field(None, ge=1, le=128)  # llama-server's fallback name for n_cmpl
    n_indent: int = Field(0, ge=0)
    t_max_predict_ms: int = -1
    t_max_prompt_ms: int = -1
    # Hints: codeserve always reuses the longest cached prefix and picks the slot itself.
    cache_prompt: bool = True
    id_slot: int = -1
    return_tokens: bool = False
    response_fields: list[str] = Field(default_factory=list)
    timings_per_token: bool = False
    # Refused unless inactive (see params.refuse_unsupported):
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    mirostat: int = 0
    dynatemp_range: float = 0.0
    typical_p: float = 1.0
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0
    top_n_sigma: float = -1.0
    lora: list[Any] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):  # llama-server wants a list; one string is read as one stop
            return [v] if v else []
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are supported, got {len(v)}")
        if isinstance(v, list):
            return [s for s in v if s != ""]
        return v

    def choices(self) -> int:
        return self.n_cmpl or self.n or 1

    def requested_tokens(self) -> int | None:
        """Tokens to generate; None: as many as the context allows (llama-server's -1)."""
        n = self.n_predict if self.n_predict is not None else self.max_tokens
        return None if n is None or n < 0 else n


class CompletionRequest(GenerationFields):
    # A string, token ids, or a one-element list of either (llama-server's batch of prompts).
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        return one_prompt(v)


class ExtraChunk(_Request):
    text: str
    filename: str = "tmp"  # llama-server's name for a chunk that gives none


class InfillRequest(GenerationFields):
    input_prefix: str
    input_suffix: str
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: str = ""  # text after the prefix (the start of the line being completed)


class TokenizeRequest(_Request):
    model: str | None = None
    content: str = ""
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)
