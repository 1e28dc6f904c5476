"""KV cache types on the real model: each loads and generates, its size is what llama.cpp
allocates, and combinations llama.cpp cannot run are refused before they can crash anything."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.kvcache import llama_cpp_kv_bytes
from server.engine.llama import LlamaEngine
from server.errors import ConfigError, ModelUnavailable
from server.registry import ModelConfig, load_registry, parse_registry
from tests.conftest import REPO, LiveServer, make_settings
from tests.test_metrics import scrape, value

TYPES = ("f16", "q8_0", "q4_0")


@pytest.fixture(scope="module")
def kv_server(model_path: Path) -> Iterator[LiveServer]:
    raw = tomllib.loads((REPO / "models.toml").read_text())
    for kv in TYPES:
        raw["models"][f"kv-{kv}"] = {
            "source": {"path": str(model_path)},
            "n_ctx": 1024,
            "kv_cache": kv,
        }
    live = LiveServer(make_settings(), parse_registry(raw, REPO / "models.toml")).start()
    yield live
    live.stop()


def test_each_kv_type_loads_and_generates(kv_server):
    with httpx.Client(base_url=kv_server.url, timeout=120) as http:
        texts = {}
        for kv in TYPES:
            r = http.post(
                "/v1/completions",
                json={
                    "model": f"kv-{kv}",
                    "prompt": "def add(a, b):\n",
                    "max_tokens": 16,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            texts[kv] = r.json()["choices"][0]["text"]
            assert r.json()["usage"]["completion_tokens"] > 0
        samples = scrape(http)
        memory = {
            kv: value(samples, "codeserve_model_memory_bytes", model=f"kv-{kv}") for kv in TYPES
        }
    assert all(texts.values())
    # same weights, smaller caches
    assert memory["f16"] > memory["q8_0"] > memory["q4_0"] > 0


@pytest.mark.parametrize("kv", TYPES)
def test_budgeted_kv_bytes_are_what_llama_cpp_allocates(model_path, kv):
    n_ctx = 2048
    cfg = ModelConfig(name=f"kv-{kv}", source={"path": model_path}, n_ctx=n_ctx, kv_cache=kv)
    engine = LlamaEngine(model_path, cfg)
    try:
        ours = engine.info.kv_cache_bytes
    finally:
        engine.close()
    theirs = llama_cpp_kv_bytes(model_path, kv, n_ctx, threads=1)
    assert theirs is not None, "llama.cpp did not report its KV cache size"
    assert abs(ours - theirs) <= 0.01 * theirs  # its log rounds to 0.01 MiB
    if kv == "q8_0":  # the target: at most 0.55x the f16 bytes (34/64 = 0.531)
        f16 = llama_cpp_kv_bytes(model_path, "f16", n_ctx, threads=1)
        assert theirs <= 0.55 * f16


def test_a_quantized_cache_turns_flash_attention_on_and_says_so(model_path, caplog):
    caplog.set_level(logging.INFO, logger="server.engine.llama")
    cfg = ModelConfig(name="kv-q", source={"path": model_path}, n_ctx=512, kv_cache="q4_0")
    assert cfg.flash_attn
    LlamaEngine(model_path, cfg).close()
    assert any(
        "flash attention turned on" in r.getMessage() and "q4_0" in r.getMessage()
        for r in caplog.records
    )


def test_explicit_flash_attn_false_with_a_quantized_cache_is_a_startup_error(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(
        'default_model = "a"\n[models.a]\nsource = { path = "a.gguf" }\n'
        'kv_cache = "q8_0"\nflash_attn = false\n'
    )
    with pytest.raises(ConfigError) as e:
        load_registry(path)
    assert 'models."a".flash_attn: false cannot be combined with kv_cache = "q8_0"' in str(e.value)


def test_a_context_llama_cpp_cannot_create_is_refused_not_crashed(model_path):
    cfg = ModelConfig(name="kv-bad", source={"path": model_path}, n_ctx=512, kv_cache="q8_0")
    bad = cfg.model_copy(update={"flash_attn": False})  # slips past validation on purpose
    with pytest.raises(ModelUnavailable, match=r"kv_cache=q8_0 flash_attn=False"):
        LlamaEngine(model_path, bad)
