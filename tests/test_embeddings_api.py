"""Embeddings over HTTP: OpenAI's /v1/embeddings (with the openai SDK), Ollama's /api/embed and
/api/embeddings, and the native /tokenize, on the offline all-MiniLM-L6-v2, checked against the
numpy reference (tests/bert_reference.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.bert_reference import BertReference
from tests.embeddings_common import MODEL, PARAPHRASE, QUERY, TEXTS, UNRELATED, cos_dist

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
