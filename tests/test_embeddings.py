"""Embeddings on the offline all-MiniLM-L6-v2: the BERT conversion and the embedding engine.

Vectors are checked against tests/bert_reference.py, a float64 numpy forward pass from the same
checkpoint that shares no code with llama.cpp or the converter. The HTTP routes are
tests/test_embeddings_api.py.
"""

from __future__ import annotations

import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import gguf
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
from server.registry import ModelConfig
from tests.bert_reference import BertReference
from tests.embeddings_common import TEXTS, cos_dist


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
