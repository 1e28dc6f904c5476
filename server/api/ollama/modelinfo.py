"""What Ollama reports about a model file (architecture, size, quantization), from its GGUF header.

Read with ``gguf`` (ggml's own GGUF reader, already a dependency) and cached per file version,
since parsing a header walks the whole vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from server.api.ollama.protocol import ModelDetails

# Scalar keys worth showing in /api/show's model_info (Ollama shows every key; the vocabulary
# arrays alone would be megabytes).
_GENERAL = (
    "general.basename",
    "general.name",
    "general.size_label",
    "general.quantization_version",
)
_PER_ARCH = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv")


@dataclass(frozen=True)
class FileInfo:
    architecture: str
    parameter_count: int
    file_type: int | None
    quantization: str
    trained_context: int | None
    extra: tuple[tuple[str, Any], ...]
    digest: str


def human_count(n: int) -> str:
    """Ollama's parameter_size spelling: 134.52M, 1.5B."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.2f}K"


def file_info(path: Path, sha256: str | None = None) -> FileInfo:
    st = path.stat()
    return _read(str(path), st.st_size, st.st_mtime_ns, sha256)


@lru_cache(maxsize=64)
def _read(path: str, size: int, mtime_ns: int, sha256: str | None) -> FileInfo:
    import gguf

    reader = gguf.GGUFReader(path)

    def get(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = get("general.architecture") or "unknown"
    file_type = get("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quant = "unknown"
    extra = [(k, get(k)) for k in _GENERAL] + [
        (f"{arch}.{k}", get(f"{arch}.{k}")) for k in _PER_ARCH
    ]
    return FileInfo(
        architecture=arch,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        file_type=file_type,
        quantization=quant if file_type is not None else "unknown",
        trained_context=get(f"{arch}.context_length"),
        extra=tuple((k, v) for k, v in extra if v is not None),
        digest=_digest(path, size, mtime_ns, sha256),
    )


def digest(path: Path, sha256: str | None = None) -> str:
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns, sha256)


def _digest(path: str, size: int, mtime_ns: int, sha256: str | None) -> str:
    # A pinned sha256 is the file's real digest; otherwise one derived from path, size and
    # mtime stands in (hashing the whole file on every listing would be slow).
    if sha256:
        return sha256.lower()
    return hashlib.sha256(f"{os.path.abspath(path)}:{size}:{mtime_ns}".encode()).hexdigest()


def details(info: FileInfo) -> ModelDetails:
    return ModelDetails(
        family=info.architecture,
        families=[info.architecture],
        parameter_size=human_count(info.parameter_count),
        quantization_level=info.quantization,
    )
