"""OpenAI wire shapes as pydantic models, and nothing else: the fields every completion route
shares, /v1/completions and FIM, usage, models and errors (chat's own: ``chat_protocol``).

Requests ignore fields they do not know, as OpenAI-compatible servers do: clients send many
provider-specific extras. Bounds are checked here so a bad value is a 400 naming the field. OpenAI
fields that would change the answer but cannot be honoured are declared and refused with a 400
naming them (see the README's table of request fields); fields without effect here (``user``,
``store``, ``metadata``, ...) are declared and accepted. Types are strict: an int field takes no
true or "7", a bool field no "yes" or 1, a token id no false. A JSON number with no fraction (1.0)
is an integer, as JSON and the OpenAPI document say.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from server.api.wire import StrictRequest as _Request
from server.api.wire import one_prompt
from server.errors import Unsupported
from server.keepalive import KeepAlive

MAX_STOP = 64


def _valid_unicode(v: str) -> str:
    # JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer can encode.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text contains a lone UTF-16 surrogate at character {e.start}, which is not valid "
            "Unicode"
        ) from None
    return v


# Every string that reaches a tokenizer, a template or a log goes through this type.
Text = Annotated[str, AfterValidator(_valid_unicode)]


class StreamOptions(_Request):
    include_usage: bool = False


def _normalize_stop(v: Any) -> Any:
    if v is None:
        return []
    if not isinstance(v, str | list):
        return v  # let pydantic report the type error
    stops = [v] if isinstance(v, str) else v
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are supported, got {len(stops)}")
    return [s for s in stops if s != ""]


# What the validators below accept, for the OpenAPI document (pydantic sees only the types).
_STOP_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
        {"type": "null"},
    ],
    "description": "Text at which generation stops (one string or a list)",
}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        _TOKEN_IDS,
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1},
    ],
    "description": "Text or token ids; a batch of prompts may hold one prompt",
}


class _SamplingFields(_Request):
    model: Text | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: Annotated[list[Text], Field(default_factory=list), WithJsonSchema(_STOP_SCHEMA)]
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # llama-server's name: stop generating (finish_reason "length") after this many milliseconds.
    t_max_predict_ms: int | None = Field(None, gt=0)
    # codeserve extensions: speculative decoding per request (default: the model's setting).
    speculative: Literal["off", "prompt_lookup", "draft"] | None = None
    speculative_max_draft: int | None = Field(None, ge=1, le=32)
    # codeserve extension, as Ollama's: how long the model stays loaded once idle ("5m", seconds).
    keep_alive: KeepAlive | None = None

    _stop = field_validator("stop", mode="before")(_normalize_stop)


class ExtraFile(_Request):
    filename: Text = "untitled"
    text: Text


class _FimFields(_Request):
    suffix: Text | None = None
    # Repository-level context for fill-in-the-middle, in llama-server's /infill shape.
    input_extra: list[ExtraFile] = Field(default_factory=list)
    filename: Text | None = None


class JsonSchemaFormat(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the grammar always enforces the schema, strict or not


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# Tagged by `type`, so the document says that `json_schema` comes with type json_schema.
ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]
# OpenAI's logit_bias keys: token ids written as strings.
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]+$")]
_LOGIT_BIAS_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "patternProperties": {"^[0-9]+$": {"type": "number", "minimum": -100, "maximum": 100}},
            "additionalProperties": False,
        },
        {"type": "null"},
    ]
}


def _refuse(body: BaseModel, fields: dict[str, Any]) -> None:
    """400 for the first field that is set to something other than its harmless value."""
    for name, harmless in fields.items():
        value = getattr(body, name)
        if value is not None and value != harmless and not (callable(harmless) and harmless(value)):
            raise Unsupported(f"`{name}` is not supported by this server", param=name)


class _ConstraintFields(_Request):
    """Output constraints shared by /v1/completions and /v1/chat/completions."""

    response_format: ResponseFormat | None = None
    # OpenAI's token-id-string keys; -100 bans a token, 100 all but forces it.
    logit_bias: Annotated[
        dict[TokenIdKey, Annotated[float, Field(ge=-100, le=100)]] | None,
        WithJsonSchema(_LOGIT_BIAS_SCHEMA),
    ] = None
    # llama-server's names: a GBNF grammar, or a JSON schema, the output must match.
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    ignore_eos: bool = False  # llama-server's: never stop at end-of-generation tokens
    # Accepted and without effect: stored completions, abuse and cache hints.
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None


class CompletionRequest(_SamplingFields, _FimFields, _ConstraintFields):
    prompt: Annotated[
        Text | list[int] | list[Text] | list[list[int]], WithJsonSchema(_PROMPT_SCHEMA)
    ]
    max_tokens: int | None = Field(16, ge=0)
    n_predict: int | None = Field(None, ge=-1)  # llama-server's max_tokens; -1: no limit
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _refusals(self) -> CompletionRequest:
        _refuse(self, {"best_of": 1})
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        return one_prompt(v)  # OpenAI also accepts a batch of prompts


class FimCompletionRequest(_SamplingFields, _FimFields):
    """Mistral's /v1/fim/completions: prompt (code before the cursor) + suffix (after it)."""

    prompt: Text
    max_tokens: int | None = Field(None, ge=1)
    random_seed: int | None = None  # Mistral's name for seed


# -- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV cache was reused rather than evaluated


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "codeserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
