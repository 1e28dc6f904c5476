"""Hostile input past the guards: a fault after a stream began, lone surrogates, lax types, and
what the OpenAPI document and metrics promise. Oversized requests and foreign hosts:
tests/test_guards.py."""

from __future__ import annotations

import json

import httpx
import pytest

from server.api.errors import _field_path
from server.api.llamacpp import errors as llamacpp_errors
from tests.conftest import LiveServer, make_settings
from tests.fakes import FakeEngine
from tests.test_api_errors import assert_error


def raw_post(client: httpx.Client, path: str, raw: str, **kw) -> httpx.Response:
    """POST a JSON text as written (so "\\ud800" escapes reach the server untouched)."""
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return client.post(path, content=raw.encode(), headers=headers, **kw)


# -- 3. an engine failure after the stream began --------------------------------------------


@pytest.fixture(scope="module")
def failing_server(registry):
    live = LiveServer(
        make_settings(), registry, engine_factory=lambda path, cfg, **kw: FakeEngine(fail_after=2)
    ).start()
    yield live
    live.stop()


def test_error_after_stream_start_is_an_event_then_done(failing_server, caplog):
    body = {"prompt": "hello", "max_tokens": 20, "stream": True}
    with (
        httpx.Client(base_url=failing_server.url, timeout=30) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if "choices" in c) == "tt"
    error = chunks[-1]["error"]
    assert error["type"] == "server_error"
    assert error["message"] == "internal error: RuntimeError: llama_decode returned -1"
    assert "Traceback" not in events[-2] and "File " not in events[-2]
    logged = [r for r in caplog.records if r.name == "server.api.openai.streaming"]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is RuntimeError


def test_openai_client_sees_the_stream_error(failing_server):
    import openai

    client = openai.OpenAI(base_url=failing_server.url + "/v1", api_key="not-needed", max_retries=0)
    stream = client.completions.create(model="smollm2-135m", prompt="hello", stream=True)
    with pytest.raises(openai.APIError, match="RuntimeError"):
        for _ in stream:
            pass


# -- 4. smaller defects ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        ("/v1/completions", '{"prompt": "a", "stop": ["\\udc00"], "max_tokens": 1}', "stop.0"),
        ("/v1/completions", '{"prompt": "a", "suffix": "\\ud83d"}', "suffix"),
        ("/v1/completions", '{"prompt": ["\\ud800"]}', "prompt.0"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
            "messages.0.content.0.text",
        ),
        ("/v1/fim/completions", '{"prompt": "def f(", "suffix": "\\ud800"}', "suffix"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(client, path, raw, param):
    err = assert_error(raw_post(client, path, raw), 400, param=param, contains="surrogate")
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": [[False]]}, "prompt"),
        ({"prompt": [True, 2]}, "prompt"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": [1, 2.5]}, "prompt"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "stream": "true"}, "stream"),
        ({"prompt": "x", "stream": 1}, "stream"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "seed": "7"}, "seed"),
        ({"prompt": "x", "stop": [1]}, "stop"),
    ],
)
def test_request_types_are_strict(client, body, param):
    err = assert_error(client.post("/v1/completions", json=body), 400)
    assert err["param"].startswith(param), err


def test_json_numbers_without_a_fraction_are_integers(client):
    # JSON has one number type and JSON Schema's "integer" includes 1.0: the document says
    # "integer", so refusing 1.0 would contradict it. Bools and strings are never numbers.
    body = {"prompt": [1, 2.0], "max_tokens": 1.0, "n": 1.0, "temperature": 0, "top_p": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 2


def test_field_names_starting_with_str_are_kept():
    body = {"stream": "x", "stream_options": {"include_usage": 3}, "prompt": 5}
    assert _field_path(("body", "stream"), body, missing=False) == "stream"
    assert (
        _field_path(("body", "stream_options", "include_usage"), body, missing=False)
        == "stream_options.include_usage"
    )
    assert _field_path(("body", "prompt", "str"), body, missing=False) == "prompt"
    assert _field_path(("body", "prompt", "list[int]"), body, missing=False) == "prompt"
    messages = {"messages": [{"role": "user", "content": [{"text": "x"}]}]}
    loc = ("body", "messages", 0, "content", "list[ContentPart]", 0, "type")
    assert _field_path(loc, messages, missing=True) == "messages.0.content.0.type"
    assert _field_path(("body", "strict"), {}, missing=True) == "strict"


def test_wrong_method_is_405_with_allow(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert paths
    for path, ops in paths.items():
        concrete = path.replace("{name}", "some-model")
        wrong = "DELETE" if "delete" not in ops else "PATCH"
        r = client.request(wrong, concrete)
        if path.startswith("/v1/"):
            assert assert_error(r, 405)["type"] == "invalid_request_error"
        else:  # Ollama's and llama-server's envelopes
            assert r.status_code == 405 and r.json()["error"], r.text
        allowed = {m.strip() for m in r.headers["allow"].split(",")}
        assert {m.upper() for m in ops} <= allowed, (path, allowed)


def test_openapi_documents_what_ollama_streams_answer(client):
    # Each answers NDJSON unless the request says "stream": false (schemathesis' content-type
    # check found /api/pull answering a type its document did not list).
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/generate", "/api/chat", "/api/pull"):
        documented = set(paths[path]["post"]["responses"]["200"]["content"])
        assert documented == {"application/json", "application/x-ndjson"}, (path, documented)
    r = client.post("/api/pull", json={"model": "smollm2-135m", "stream": None})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert r.text.splitlines()[-1] == '{"status":"success"}'


def test_openapi_documents_400_envelopes_and_no_422(client):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert "ErrorResponse" in schemas
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            envelope = "ErrorResponse"
            if path.startswith("/api/"):
                envelope = "OllamaError"
            elif path.startswith(llamacpp_errors.PREFIXES):
                envelope = "LlamaServerError"
            for status in ("400", "default"):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                assert ref == f"#/components/schemas/{envelope}", (method, path, status)
    stream = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(stream)


def test_kv_cache_ratio_is_of_every_slot(server, client):
    r = client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 4})
    assert r.status_code == 200
    text = client.get("/metrics").text

    def sample(name: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(name + '{model="smollm2-135m"'))
        return float(line.rsplit(" ", 1)[1])

    tokens, ratio = sample("codeserve_kv_cache_tokens"), sample("codeserve_kv_cache_usage_ratio")
    manager = server.app.state.manager
    cells = manager.config(None).n_ctx * manager.settings.slots  # the batched engine's slots
    assert tokens > 0
    assert ratio == pytest.approx(tokens / cells)
