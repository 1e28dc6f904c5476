"""Ollama wire shapes (api/types.go in ollama/ollama) as pydantic models, and nothing else.

Requests ignore fields they do not know, as Ollama's Go decoder does; fields that would change
the answer and are not implemented are refused by the routes with a 400 naming them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.keepalive import KeepAlive

# The Ollama release whose API these shapes follow; clients gate features on /api/version.
OLLAMA_API_VERSION = "0.12.0"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerationFields(_Request):
    model: str = ""
    stream: bool | None = None  # Ollama streams unless told not to
    format: Any = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)

    @property
    def streaming(self) -> bool:
        return self.stream is not False


class GenerateRequest(GenerationFields):
    prompt: str = ""
    suffix: str = ""
    system: str = ""
    template: str = ""
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class Message(_Request):
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None
    tool_name: str | None = None
    thinking: str | None = None

    @field_validator("role")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()  # Ollama lower-cases roles


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class ShowRequest(_Request):
    model: str = ""
    name: str = ""  # the older spelling; Continue still sends it
    verbose: bool = False


class PullRequest(_Request):
    model: str = ""
    name: str = ""
    stream: bool | None = None
    insecure: bool = False


# -- responses --------------------------------------------------------------------------------


def timestamp(t: float | None = None) -> str:
    """RFC 3339 in UTC, as Go's time.Time marshals."""
    dt = datetime.now(UTC) if t is None else datetime.fromtimestamp(t, UTC)
    return dt.isoformat().replace("+00:00", "Z")


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(TokenLogprob):
    top_logprobs: list[TokenLogprob] | None = None


class _Final(BaseModel):
    """Fields of the last object of a response (Ollama's Metrics, durations in nanoseconds)."""

    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateChunk(_Final):
    model: str
    created_at: str = Field(default_factory=timestamp)
    response: str
    done: bool
    context: list[int] | None = None
    logprobs: list[Logprob] | None = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str


class ChatChunk(_Final):
    model: str
    created_at: str = Field(default_factory=timestamp)
    message: ChatMessageOut
    done: bool
    logprobs: list[Logprob] | None = None


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class RunningModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Progress(BaseModel):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
