"""Shared fixtures: one live codeserve (uvicorn on a free port) on the real default model.

The server runs in this process on a background thread, so tests drive it over real HTTP
(streaming and disconnects included) while ``caplog`` still sees its request log lines.
"""

from __future__ import annotations

import socket
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from quantize.convert import download_sdist
from server.api.app import create_app
from server.registry import Registry, parse_registry
from server.settings import ServerSettings
from server.store import ModelStore

# The embedding tests' session fixtures (the converted all-MiniLM-L6-v2, its numpy reference),
# visible to every module so the conversion and the reference are built once per session.
from tests.embeddings_common import (  # noqa: F401
    checkpoint,
    embed_cfg,
    embed_gguf,
    reference,
    store,
)

REPO = Path(__file__).resolve().parent.parent
SMALL_CTX_MODEL = "smollm2-135m-ctx512"
FIM_MODEL = "smollm2-135m-fim"
# SmolLM2 has no FIM tokens. Its unused control tokens <issue_start>, <issue_comment> and
# <issue_closed> (ids 8, 9, 10) are declared as FIM prefix/suffix/middle through GGUF metadata
# overrides, so the whole FIM path runs on a real model (the text it fills in is not meaningful).
FIM_OVERRIDES = {
    "tokenizer.ggml.fim_pre_token_id": 8,
    "tokenizer.ggml.fim_suf_token_id": 9,
    "tokenizer.ggml.fim_mid_token_id": 10,
}


class LiveServer:
    def __init__(self, settings: ServerSettings, registry: Registry, engine_factory=None):
        self.app = create_app(settings, registry, engine_factory)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server at {self.url} did not become healthy in {timeout}s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model's GGUF (``make test`` pulls it first; pulled here if run directly)."""
    registry = parse_registry(
        tomllib.loads((REPO / "models.toml").read_text()), REPO / "models.toml"
    )
    return ModelStore(registry, ServerSettings().cache_dir).pull(registry.default)


@pytest.fixture(scope="session")
def registry(model_path: Path) -> Registry:
    """The repo's models.toml plus a 512-token-context copy of the default model.

    The small context makes context overflow and max_tokens clamping cheap to test, and gives a
    second resident model.
    """
    raw = tomllib.loads((REPO / "models.toml").read_text())
    raw["models"][SMALL_CTX_MODEL] = {"source": {"path": str(model_path)}, "n_ctx": 512}
    raw["models"][FIM_MODEL] = {
        "source": {"path": str(model_path)},
        "n_ctx": 2048,
        "kv_overrides": FIM_OVERRIDES,
    }
    return parse_registry(raw, REPO / "models.toml")


async def greedy_run(worker, prompt: list[int], max_tokens: int) -> tuple[int, str]:
    """A greedy request through a ``ModelWorker``: (prompt tokens that came from a cache, text)."""
    from server.engine.base import Delta, Finished, GenerationRequest, SamplingParams

    req = GenerationRequest(prompt, max_tokens, sampling=SamplingParams(temperature=0))
    text, cached = "", -1
    async for ev in worker.stream(req):
        if isinstance(ev, Delta):
            text += ev.text
        elif isinstance(ev, Finished):
            cached = ev.timings.cached_tokens
    return cached, text


def batch_context(model, *, n_ctx: int, n_seq: int, n_batch: int = 256):
    """The batched engine's context for a loaded ``Model``: q8_0 KV, flash attention, 2 threads."""
    from server.engine.base import ggml_kv_type
    from server.engine.binding import BatchContext

    return BatchContext(
        model.weights,
        n_ctx=n_ctx,
        n_seq=n_seq,
        n_batch=n_batch,
        threads=2,
        kv_type=ggml_kv_type("q8_0"),
        flash_attn=True,
    )


def make_settings(**overrides) -> ServerSettings:
    base = {"host": "127.0.0.1", "port": 0, "models_file": REPO / "models.toml"}
    return ServerSettings(**{**base, **overrides})


@pytest.fixture(scope="session")
def server(registry: Registry) -> Iterator[LiveServer]:
    live = LiveServer(make_settings(), registry).start()
    yield live
    live.stop()


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def fim_server(registry: Registry) -> Iterator[LiveServer]:
    """codeserve serving the FIM model by default, as an editor's completion server runs."""
    live = LiveServer(make_settings(model=FIM_MODEL), registry).start()
    yield live
    live.stop()


@pytest.fixture()
def fim(fim_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fim_server.url, timeout=120) as c:
        yield c


@pytest.fixture()
def openai_client(server: LiveServer):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's vocab-only GGUFs (starcoder, deepseek-coder, ...) from the llama-cpp-python
    sdist on PyPI, fetched once into the cache."""
    import llama_cpp

    version = llama_cpp.__version__
    target = ServerSettings().cache_dir.parent / "vocab" / f"llama-cpp-python-{version}"
    if not (target / "ggml-vocab-starcoder.gguf").is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            sdist = download_sdist(version, Path(tmp))
            with tarfile.open(sdist) as tf:
                for member in tf.getmembers():
                    name = Path(member.name).name
                    if "/vendor/llama.cpp/models/" in member.name and name.endswith(".gguf"):
                        member.name = name
                        tf.extract(member, target, filter="data")
    return target
