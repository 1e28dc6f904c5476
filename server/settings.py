"""Server settings, written once: ``CODESERVE_*`` environment variables, and the CLI flags that
server.cli derives from these classes (a flag wins over its variable)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.errors import ConfigError

_REPO_MODELS_FILE = Path(__file__).resolve().parent.parent / "models.toml"


def _default_models_file() -> Path:
    here = Path("models.toml")
    return here.resolve() if here.is_file() else _REPO_MODELS_FILE


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "codeserve" / "models"


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


# Read from one comma-separated environment variable rather than JSON.
HostList = Annotated[list[str], NoDecode]


class StoreSettings(BaseSettings):
    """What every subcommand needs to find models: ``pull`` and ``models`` take only these."""

    model_config = SettingsConfigDict(env_prefix="CODESERVE_", extra="forbid")

    models_file: Path = Field(
        default_factory=_default_models_file,
        description="the model registry (./models.toml when there is one)",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="where fetched models are kept"
    )
    model: str | None = Field(
        None, description="the default model: served, or pulled, when none is named"
    )


class ServerSettings(StoreSettings):
    """``codeserve serve``: each field is a ``--flag`` and a ``CODESERVE_*`` variable."""

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(None, description="require `Authorization: Bearer KEY`")
    allow_unauthenticated_remote: bool = Field(
        False, description="bind a non-loopback address without an API key (you asked for it)"
    )
    queue_size: int = Field(64, ge=1, description="requests waiting per model before 429")
    queue_timeout_s: float = Field(
        120.0, gt=0, description="a request not started within this time fails with 503"
    )
    memory_budget_mb: int = Field(
        default_factory=lambda: int(_total_memory_bytes() * 0.75) >> 20,
        gt=0,
        description="resident models are unloaded least-recently-used beyond this",
    )
    engine: Literal["auto", "simple", "batched"] = Field(
        "auto",
        description="batched: many sequences per llama_decode (concurrent streams, n > 1), each "
        "may speculate with prompt lookup or the model's draft model; simple: one sequence at a "
        "time, speculating the same ways; auto: batched",
    )
    slots: int = Field(8, ge=1, le=64, description="sequences the batched engine runs at once")
    prompt_cache_mb: int | None = Field(
        None,
        ge=0,
        description="host RAM per model for prompt states the batched engine drops from its KV "
        "cache, restored when a prompt shares a long prefix with one (default: an eighth of the "
        "memory budget, at most 512; 0 turns it off)",
    )
    stream_frame_ms: float = Field(
        30.0,
        ge=0,
        description="after a stream's first token, tokens share a frame, none held longer than "
        "this many milliseconds (0: every token its own frame); the batched engine",
    )
    prefill_chunk: int = Field(
        128, ge=16, description="prompt tokens per batched step while others are decoding"
    )
    shutdown_drain_s: float = Field(
        5.0,
        ge=0,
        description="on SIGTERM, running requests get this long to finish before they are "
        "cancelled (each stream still ends with an error event and [DONE])",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn's log level"
    )
    max_body_mb: float = Field(
        8.0, gt=0, description="request bodies larger than this are refused with 413"
    )
    allowed_hosts: HostList = Field(
        default_factory=list,
        description="Host names this server may be reached by besides loopback names, IP "
        "addresses and the bound host (comma-separated; '*' for any, '*.example.com' patterns); "
        "other Host headers get 403, which defeats DNS rebinding",
    )
    allowed_origins: HostList = Field(
        default_factory=list,
        description="browser Origins allowed to call the server besides loopback pages and local "
        "apps (comma-separated, e.g. 'https://app.example.com,http://intranet:*'; '*' for any)",
    )
    cors_origins: HostList = Field(
        default_factory=list,
        description="Origins whose browser pages may read responses (CORS; off when empty; "
        "comma-separated, '*' for any); these origins are also allowed",
    )

    @field_validator("allowed_hosts", "allowed_origins", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, v: object) -> object:
        # Like OLLAMA_ORIGINS: one comma-separated variable, not a JSON list.
        if isinstance(v, str):
            return [item.strip() for item in v.split(",") if item.strip()]
        return v

    def prompt_cache(self) -> int:
        """MiB of prompt states a batched engine may keep in host RAM."""
        if self.prompt_cache_mb is not None:
            return self.prompt_cache_mb
        return min(512, self.memory_budget_mb // 8)

    @model_validator(mode="after")
    def _refuse_open_bind(self) -> ServerSettings:
        if (
            self.api_key is None
            and not self.allow_unauthenticated_remote
            and not _is_loopback(self.host)
        ):
            raise ConfigError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach this "
                "address could use the model. Set --api-key / CODESERVE_API_KEY, or pass "
                "--allow-unauthenticated-remote if this network is trusted."
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
