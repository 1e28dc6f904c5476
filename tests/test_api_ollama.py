"""Ollama's API on the real model, driven by the official `ollama` Python client."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime

import ollama
import pytest

from server.api.ollama.protocol import GenerateChunk
from server.api.ollama.streaming import ndjson
from server.errors import ModelUnavailable
from tests.conftest import FIM_MODEL, SMALL_CTX_MODEL

DEFAULT = "smollm2-135m"
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture()
def oc(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def test_root_version_and_tags(client, oc):
    assert client.get("/").text == "Ollama is running"
    assert client.head("/").status_code == 200
    assert "version" in client.get("/api/version").json()
    listed = {m.model: m for m in oc.list().models}
    assert {f"{DEFAULT}:latest", f"{FIM_MODEL}:latest", f"{SMALL_CTX_MODEL}:latest"} <= set(listed)
    m = listed[f"{DEFAULT}:latest"]
    assert m.size > 50 << 20 and m.details.family == "llama"
    assert m.details.quantization_level == "Q4_1" and m.details.parameter_size.endswith("M")


def test_show_template_has_suffix_only_for_fim_models(oc):
    fim = oc.show(FIM_MODEL)
    assert ".Suffix" in fim.template and "insert" in fim.capabilities
    plain = oc.show(f"{DEFAULT}:latest")
    assert ".Suffix" not in (plain.template or "") and plain.capabilities == ["completion"]
    assert plain.modelinfo["general.architecture"] == "llama"
    assert plain.modelinfo["llama.context_length"] == 8192
    assert "num_ctx 8192" in plain.parameters  # Continue reads the context size from here
    assert plain.details.format == "gguf" and plain.details.family == "llama"
    assert oc.show(SMALL_CTX_MODEL).modelinfo["llama.context_length"] == 512


def test_generate_streamed_and_not(oc):
    whole = oc.generate(model=DEFAULT, prompt="Name a colour.", options=GREEDY, stream=False)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.response
    assert 0 < whole.eval_count <= 8 and whole.prompt_eval_count > 0
    assert whole.total_duration >= whole.eval_duration > 0 and whole.context
    parts = list(oc.generate(model=DEFAULT, prompt="Name a colour.", options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].eval_count == whole.eval_count and parts[-1].context == whole.context
    # `context` carries the conversation on: the next prompt is evaluated after it.
    more = oc.generate(
        model=DEFAULT, prompt="Another.", context=whole.context, options=GREEDY, stream=False
    )
    assert more.prompt_eval_count > len(whole.context)


def test_generate_ndjson_framing(client):
    body = {"model": DEFAULT, "prompt": "Hi", "options": GREEDY}
    with client.stream("POST", "/api/generate", json=body) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["done"] is True and "eval_duration" in lines[-1]
    assert datetime.fromisoformat(lines[-1]["created_at"]).tzinfo == UTC


def test_generate_with_suffix_fills_in_the_middle(oc):
    r = oc.generate(
        model=FIM_MODEL, prompt="def add(a, b):\n", suffix="\n", options=GREEDY, stream=False
    )
    assert r.done and r.eval_count > 0 and r.context is None
    with pytest.raises(ollama.ResponseError) as e:
        oc.generate(model=DEFAULT, prompt="x", suffix="y", options=GREEDY)
    assert e.value.status_code == 400 and "suffix" in e.value.error


def test_chat_streamed_and_not(oc):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = oc.chat(model=DEFAULT, messages=messages, options=GREEDY, stream=False)
    assert whole.message.role == "assistant" and whole.message.content and whole.done
    parts = list(oc.chat(model=DEFAULT, messages=messages, options=GREEDY, stream=True))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert "".join(p.message.content for p in parts) == whole.message.content


def test_empty_requests_load_the_model(oc):
    assert oc.generate(model=SMALL_CTX_MODEL, prompt="").done_reason == "load"
    assert oc.chat(model=SMALL_CTX_MODEL, messages=[]).done_reason == "load"
    names = [m.model for m in oc.ps().models]
    assert f"{SMALL_CTX_MODEL}:latest" in names


def test_ps_lists_resident_models(oc):
    oc.generate(model=DEFAULT, prompt="Hi", options=GREEDY)
    running = {m.model: m for m in oc.ps().models}
    m = running[f"{DEFAULT}:latest"]
    assert m.size > 50 << 20 and m.size_vram is not None and m.context_length == 8192
    assert m.expires_at.year > 2200  # the default model never idles out


def test_pull_of_a_local_registry_entry(oc):
    assert oc.pull(DEFAULT).status == "success"
    steps = list(oc.pull(f"{DEFAULT}:latest", stream=True))
    assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
    assert any(s.total and s.completed == s.total for s in steps)


def test_name_tag_rule(oc):
    # name:tag with the colon spelled as a dash in models.toml
    r = oc.generate(model="smollm2:135m", prompt="Hi", options=GREEDY, stream=False)
    assert r.done and r.model == "smollm2:135m"


def gen(**fields: object) -> dict:
    return {"model": DEFAULT, "prompt": "x", **fields}


BAD = [
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "not found"),
    ("/api/generate", gen(format="json"), 400, "format"),
    ("/api/generate", gen(images=["aGk="]), 400, "images"),
    ("/api/generate", gen(template="{{ .Prompt }}"), 400, "tem"),
    ("/api/generate", gen(options={"mirostat": 2}), 400, "mirostat"),
    ("/api/generate", gen(options={"temprature": 1}), 400, "temp"),
    ("/api/generate", gen(options={"num_ctx": 99999}), 400, "num_ctx"),
    ("/api/generate", gen(keep_alive="soon"), 400, "keep_alive"),
    ("/api/generate", gen(raw=True, system="s"), 400, "raw"),
    ("/api/generate", {"model": SMALL_CTX_MODEL, "prompt": "x " * 600}, 400, "context length"),
    ("/api/generate", {"prompt": "x"}, 400, "model is required"),
    ("/api/chat", {"model": DEFAULT, "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/api/chat", {"model": DEFAULT, "messages": [{"role": "user"}], "format": {}}, 400, "format"),
    ("/api/chat", {"model": DEFAULT, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/api/chat", {"model": DEFAULT, "messages": "hi"}, 400, "messages"),
    ("/api/chat", {"model": "nope:7b", "messages": []}, 404, "not found"),
    ("/api/show", {"model": "nope"}, 404, "not found"),
    ("/api/show", {}, 400, "model is required"),
    ("/api/pull", {"model": "nope"}, 404, "not found"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "words"), BAD)
def test_bad_input_answers_in_ollama_shape(client, path, body, status, words):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"]


def test_invalid_json_and_client_errors(client, oc):
    r = client.post("/api/generate", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and list(r.json()) == ["error"]
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404


def test_disconnect_frees_the_slot(client, caplog):
    caplog.set_level(logging.INFO, logger="codeserve.requests")
    # Greedy, raw: the model counts on past 1,000 tokens, so the stream is still going when the
    # client leaves (a sampled answer ended within 5 tokens about one run in 25).
    count = {"prompt": "1, 2, 3, 4, 5,", "raw": True}
    body = {"model": DEFAULT, **count, "options": {"num_predict": 3000, "temperature": 0}}
    with client.stream("POST", "/api/generate", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break  # closing the response drops the connection
    again = client.post("/api/generate", json={**body, "options": GREEDY, "stream": False})
    assert again.status_code == 200 and again.json()["done"]
    lines = [r.getMessage() for r in caplog.records if r.name == "codeserve.requests"]
    cancelled = [m for m in lines if "endpoint=generate" in m and "outcome=cancelled" in m]
    assert cancelled, lines
    assert int(cancelled[0].split("completion_tokens=")[1].split()[0]) < 200


def test_num_ctx_narrows_the_window(client):
    # A client's smaller num_ctx is honoured: the answer stops with "length" when it is full.
    opts = {"num_ctx": 220, "temperature": 0}
    body = {"model": SMALL_CTX_MODEL, "prompt": "x " * 150, "raw": True, "options": opts}
    with client.stream("POST", "/api/generate", json=body) as r:
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "length"
    assert lines[-1]["prompt_eval_count"] + lines[-1]["eval_count"] == 220


def test_an_error_after_the_stream_began_is_its_last_line():
    async def chunks():
        yield GenerateChunk(model="m", response="par", done=False)
        raise ModelUnavailable("the engine failed")

    async def body() -> list[dict]:
        response = ndjson(chunks())
        return [json.loads(b) async for b in response.body_iterator]

    lines = asyncio.run(body())
    assert lines == [
        {"model": "m", "created_at": lines[0]["created_at"], "response": "par", "done": False},
        {"error": "the engine failed"},
    ]


def test_continue_autocomplete_request(client):
    """What Continue's ollama provider sends for autocomplete, num_ctx taken from /api/show."""
    shown = client.post("/api/show", json={"name": FIM_MODEL}).json()
    num_ctx = int(shown["parameters"].split("num_ctx")[1].split()[0])
    body = {
        "model": FIM_MODEL,
        "prompt": "def fib(n):\n    ",
        "suffix": "\n\nprint(fib(10))\n",
        "options": {
            "temperature": 0.01,
            "num_predict": 16,
            "stop": ["\n\n"],
            "num_ctx": num_ctx,
            "num_thread": 2,
            "use_mmap": True,
            "num_gpu": 0,
        },
        "keep_alive": 1800,
        "stream": True,
    }
    with client.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["done"] and lines[-1]["eval_count"] <= 16


def test_name_resolution_rule(registry):
    from server.api.ollama.names import resolve
    from server.errors import ModelNotFound

    assert resolve(registry, "smollm2-135m") == "smollm2-135m"
    assert resolve(registry, "smollm2-135m:latest") == "smollm2-135m"
    assert resolve(registry, "qwen2.5-coder:1.5b") == "qwen2.5-coder-1.5b"
    assert resolve(registry, "SmolLM2:135M") == "smollm2-135m"
    with pytest.raises(ModelNotFound, match="model 'llama3:8b' not found"):
        resolve(registry, "llama3:8b")


def test_options_mapping():
    from server.api.ollama.options import parse_options
    from server.errors import InvalidRequest

    o = parse_options({"num_predict": -1, "seed": -1, "stop": "\n", "num_thread": 8}, 4096)
    assert o.num_predict is None and o.sampling.seed is None and o.stop == ("\n",)
    assert (o.sampling.temperature, o.sampling.top_p, o.sampling.min_p) == (0.8, 0.9, 0.0)
    o = parse_options({"temperature": 0, "top_k": 5, "num_ctx": 1024, "num_predict": 7}, 4096)
    assert (o.sampling.temperature, o.sampling.top_k, o.num_ctx, o.num_predict) == (0, 5, 1024, 7)
    for bad, name in [
        ({"top_k": "many"}, "top_k"),
        ({"temperature": -1}, "temperature"),
        ({"repeat_penalty": 1.2, "repeat_last_n": 128}, "repeat_last_n"),
        ({"typical_p": 0.5}, "typical_p"),
        ({"stop": [1]}, "stop"),
    ]:
        with pytest.raises(InvalidRequest, match=f"options.{name}"):
            parse_options(bad, 4096)
    # a repetition window other than 64 is harmless while no penalty is on
    assert parse_options({"repeat_last_n": 0}, 4096).sampling.repeat_penalty == 1.0


def test_pull_failure_after_progress_is_the_last_line(server, client, oc, monkeypatch):
    def unreachable(cfg):
        time.sleep(2.5)  # long enough for a heartbeat line first
        raise ModelUnavailable(f"model {cfg.name!r}: cannot reach the hub")

    monkeypatch.setattr(server.app.state.manager.store, "pull", unreachable)
    with client.stream("POST", "/api/pull", json={"model": "qwen2.5-coder:0.5b"}) as r:
        assert r.status_code == 200
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[1] == {"status": "pulling qwen2.5-coder-0.5b"}
    assert lines[-1] == {"error": "model 'qwen2.5-coder-0.5b': cannot reach the hub"}
    with pytest.raises(ollama.ResponseError, match="cannot reach"):
        list(oc.pull("qwen2.5-coder:0.5b", stream=True))
    r = client.post("/api/pull", json={"model": "qwen2.5-coder:0.5b", "stream": False})
    assert r.status_code == 503 and r.json() == {
        "error": "model 'qwen2.5-coder-0.5b': cannot reach the hub"
    }
