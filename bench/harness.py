"""Servers under test as subprocesses on free ports, and robust summaries.

codeserve, llama-cpp-python's own server and llama.cpp's C++ llama-server are started with the
same model file, context and thread count, so only the serving stack differs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from server.engine.base import ggml_kv_type

_VOCABS: dict[Path, Any] = {}

# A pause before a request goes to another peer than the last one: llama.cpp's OpenMP threads spin
# some milliseconds after a decode before they sleep (libgomp's default), and the next peer's
# request should not share the cores with the last one's spinning threads.
SETTLE_S = 0.02

# Each running server's process, by base URL, so the suite can say which libraries it ran.
_PIDS: dict[str, int] = {}
_LIBRARY_NAMES = ("libllama", "libggml")


def token_counter(gguf: Path, *, prompt: bool = True) -> Callable[[str], int]:
    """Token counts from a GGUF's own vocabulary, the same for every peer: of a prompt (with its
    BOS and special markers), or of generated text (``prompt=False``)."""
    import llama_cpp

    if gguf not in _VOCABS:
        _VOCABS[gguf] = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    vocab = _VOCABS[gguf]
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=prompt, special=prompt))


def engine_context(model: Any, cells: int = 8192, n_seq: int = 8) -> Any:
    """The batched engine's llama.cpp context as the in-process benches build it for a loaded
    ``Model``: ``n_seq`` sequences of ``cells`` cells, the model's KV type, flash attention, 2
    threads, batches of 512."""
    from server.engine.binding import BatchContext

    return BatchContext(
        model.weights,
        n_ctx=cells * n_seq,
        n_seq=n_seq,
        n_batch=512,
        threads=2,
        kv_type=ggml_kv_type(model.cfg.kv_cache),
        flash_attn=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x == x]  # drop NaNs
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "runs": []}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(frozen=True)
class Target:
    """How to run one model: the file and the settings every peer gets."""

    name: str
    path: Path
    n_ctx: int
    threads: int
    n_batch: int = 512
    kv_cache: str = "f16"
    flash_attn: bool = False


@contextmanager
def _process(
    cmd: list[str], url: str, ready: str, log_name: str, env: dict[str, str | None] | None = None
) -> Iterator[str]:
    """Run ``cmd`` until the context ends, once ``url + ready`` answers; ``env`` adds to its
    environment (None removes a variable)."""
    environ = {**os.environ, **(env or {})}
    fd, log_path = tempfile.mkstemp(prefix=f"bench-{log_name}-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in environ.items() if v is not None},
        )
    try:
        deadline = time.monotonic() + 180
        while not _ok(url + ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{log_name} did not start; see {log_path}")
            time.sleep(0.25)
        _PIDS[url] = proc.pid
        yield url
    finally:
        _PIDS.pop(url, None)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def loaded_libraries(pid: int | str = "self") -> list[str]:
    """The llama.cpp and ggml shared libraries a process has mapped, sorted (Linux; empty where
    /proc is not). Which build a peer runs is not always the one it was installed with:
    ``LD_LIBRARY_PATH`` outranks a wheel's RUNPATH, so a variable set for one peer's sake can
    hand another peer's libraries to codeserve."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    rows = (line.split(None, 5) for line in maps.splitlines())
    paths = {row[5] for row in rows if len(row) == 6}  # the sixth column, where there is one
    return sorted(p for p in paths if Path(p).name.startswith(_LIBRARY_NAMES))


def server_libraries(url: str) -> list[str]:
    """``loaded_libraries`` of the server started at ``url`` by this module."""
    return loaded_libraries(_PIDS[url]) if url in _PIDS else []


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _codeserve_registry(t: Target, variants: dict[str, dict]) -> Path:
    lines = [f'default_model = "{t.name}"', ""]
    for name, over in {t.name: {}, **variants}.items():
        settings = {
            "n_ctx": t.n_ctx,
            "n_batch": t.n_batch,
            "n_threads": t.threads,
            "kv_cache": t.kv_cache,
            **{k: v for k, v in over.items() if k != "path"},
        }
        lines += [
            f'[models."{name}"]',
            f'source = {{ path = "{over.get("path", t.path)}" }}',
            *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),  # JSON scalars are TOML
            "",
        ]
    fd, path = tempfile.mkstemp(prefix="bench-models-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    return Path(path)


@contextmanager
def codeserve(
    t: Target | None = None,
    variants: dict[str, dict] | None = None,
    engine: str = "auto",
    env: dict[str, str | None] | None = None,
) -> Iterator[str]:
    """codeserve on a registry made for `t` (plus variants), or on the user's models.toml;
    `env` is added to its environment (None removes a variable)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--port",
        str(port),
        "--engine",
        engine,
        "--log-level",
        "warning",
    ]
    registry = _codeserve_registry(t, variants or {}) if t is not None else None
    if registry is not None:
        cmd += ["--models-file", str(registry)]
    try:
        with _process(cmd, f"http://127.0.0.1:{port}", "/health", "codeserve", env) as url:
            yield url
    finally:
        if registry is not None:
            registry.unlink(missing_ok=True)


@contextmanager
def llama_cpp_python_server(t: Target) -> Iterator[str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(t.path),
        "--port",
        str(port),
        "--n_ctx",
        str(t.n_ctx),
        "--n_threads",
        str(t.threads),
        "--n_threads_batch",
        str(t.threads),
        "--n_batch",
        str(t.n_batch),
        "--type_k",
        str(ggml_kv_type(t.kv_cache)),
        "--type_v",
        str(ggml_kv_type(t.kv_cache)),
        "--flash_attn",
        str(t.flash_attn),
    ]
    with _process(cmd, f"http://127.0.0.1:{port}", "/v1/models", "llama-cpp-python") as url:
        yield url


def find_llama_server(explicit: str | None) -> str | None:
    return explicit or os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


def llama_server_args(t: Target, slots: int = 8) -> list[str]:
    """llama-server's flags (after the binary). Each of the `slots` parallel sequences gets the
    same context as the single-slot servers. No prompt-cache flag is passed: the prompt cache
    (``cache_prompt``), its host-RAM store (``--cache-ram``), saving idle slots to it and chunk
    reuse (``--cache-reuse``, off) stay at llama-server's defaults, as a user gets them."""
    return [
        "-m",
        str(t.path),
        "-c",
        str(t.n_ctx * slots),
        "-np",
        str(slots),
        "-t",
        str(t.threads),
        "-tb",
        str(t.threads),
        "-b",
        str(t.n_batch),
        "-ctk",
        t.kv_cache,
        "-ctv",
        t.kv_cache,
        "-fa",
        "on" if t.flash_attn else "off",
        "--no-webui",
    ]


@contextmanager
def llama_server(t: Target, binary: str, slots: int = 8) -> Iterator[str]:
    port = free_port()
    cmd = [binary, *llama_server_args(t, slots), "--port", str(port)]
    with _process(cmd, f"http://127.0.0.1:{port}", "/health", "llama-server") as url:
        yield url


@contextmanager
def servers(
    t: Target,
    peers: list[str],
    llama_server_bin: str | None,
    variants: dict[str, dict] | None = None,
) -> Iterator[dict[str, str]]:
    """Start every HTTP peer asked for; yields {peer: base URL}."""
    with ExitStack() as stack:
        urls = {}
        for peer in peers:
            if peer == "codeserve":
                urls[peer] = stack.enter_context(codeserve(t, variants))
            elif peer == "codeserve-simple":  # the one-sequence-at-a-time engine, for reference
                urls[peer] = stack.enter_context(codeserve(t, engine="simple"))
            elif peer == "llama-cpp-python":
                urls[peer] = stack.enter_context(llama_cpp_python_server(t))
            elif peer == "llama-server":
                assert llama_server_bin is not None
                urls[peer] = stack.enter_context(llama_server(t, llama_server_bin))
        yield urls


def target(model: str | None = None, gguf: Path | None = None) -> Target:
    """The Target for a registry model (the default when None), pulled if needed; with `gguf`,
    that file with the model's settings (e.g. an F16 build from `codeserve quantize`)."""
    from server.engine.base import available_cores
    from server.registry import load_registry
    from server.settings import StoreSettings
    from server.store import ModelStore

    settings = StoreSettings()
    registry = load_registry(settings.models_file)
    cfg = registry.models[model or registry.default_model]
    path = gguf.resolve() if gguf else ModelStore(registry, settings.cache_dir).pull(cfg)
    name = gguf.stem.lower() if gguf else cfg.name
    threads = cfg.n_threads or available_cores()
    return Target(name, path, cfg.n_ctx, threads, cfg.n_batch, cfg.kv_cache, cfg.flash_attn)
