"""Hugging Face checkpoint -> GGUF F16 with llama.cpp's own converter.

The converter (``convert_hf_to_gguf.py`` with its ``conversion`` package and ``gguf-py``) ships in
the llama-cpp-python sdist on PyPI, vendored at the same llama.cpp commit as the installed
library. It is fetched once with pip into the cache rather than kept in this repository, and run
with the current interpreter. It imports torch, transformers and sentencepiece, which codeserve
does not install by default, so this path checks for them first and says how to get them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from quantize.errors import QuantizeError

_VENDOR = "vendor/llama.cpp/"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
_NEEDED = ("torch", "transformers", "sentencepiece")


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "codeserve"


def check_checkpoint(hf_dir: Path) -> None:
    if not (hf_dir / "config.json").is_file():
        raise QuantizeError(
            f"{hf_dir}: not a Hugging Face checkpoint (no config.json); give a GGUF file or a "
            "directory saved with save_pretrained()"
        )


def missing_modules() -> list[str]:
    return [m for m in _NEEDED if importlib.util.find_spec(m) is None]


def check_ready(hf_dir: Path) -> None:
    """Everything conversion needs that can be checked without fetching or writing anything."""
    check_checkpoint(hf_dir)
    missing = missing_modules()
    if missing:
        raise QuantizeError(
            f"converting a Hugging Face checkpoint needs {', '.join(_NEEDED[:-1])} and "
            f"{_NEEDED[-1]} (llama.cpp's converter imports them); missing: {', '.join(missing)}. "
            "Install them "
            "(pip install 'codeserve[convert]') or convert elsewhere and pass the F16 GGUF."
        )


def download_sdist(version: str, dest: Path) -> Path:
    """The llama-cpp-python sdist of `version` (it vendors llama.cpp) from PyPI, into `dest`."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        f"llama-cpp-python=={version}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise QuantizeError(
            f"could not fetch the llama-cpp-python=={version} sdist:\n"
            + done.stderr.strip()[-2000:]
        )
    return next(dest.glob("*.tar.gz"))


def converter_dir(cache_root: Path, progress: Callable[[str], None] = print) -> Path:
    """The converter of the installed llama-cpp-python version, fetched on first use."""
    import llama_cpp

    version = llama_cpp.__version__
    target = cache_root / f"llama-cpp-python-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    progress(f"convert: fetching llama.cpp's converter (llama-cpp-python=={version} sdist)")
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root) as tmp:
        sdist = download_sdist(version, Path(tmp))
        staging = Path(tmp) / "converter"
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                _, _, inner = member.name.partition("/")
                if not inner.startswith(_VENDOR):
                    continue
                rel = inner.removeprefix(_VENDOR)
                if rel.startswith(_MEMBERS):
                    member.name = rel
                    tf.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise QuantizeError(f"{sdist.name} has no {_VENDOR}convert_hf_to_gguf.py")
        # A rename keeps a half-extracted converter from ever being picked up.
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def convert_hf(
    hf_dir: Path,
    dst: Path,
    *,
    cache_root: Path | None = None,
    progress: Callable[[str], None] = print,
) -> Path:
    """Convert ``hf_dir`` to an F16 GGUF at ``dst`` (written to ``dst.tmp`` then renamed)."""
    check_ready(hf_dir)
    script = converter_dir(cache_root or default_cache_root(), progress) / "convert_hf_to_gguf.py"
    tmp = dst.with_name(dst.name + ".tmp")
    cmd = [sys.executable, str(script), str(hf_dir), "--outtype", "f16", "--outfile", str(tmp)]
    progress(f"convert: {hf_dir} -> {dst.name} (llama.cpp convert_hf_to_gguf.py, F16)")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use its own gguf-py
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not tmp.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
            raise QuantizeError(
                f"llama.cpp's converter failed on {hf_dir} (exit {done.returncode}):\n"
                + "\n".join(tail)
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
