"""Bad input over HTTP: always a 4xx in OpenAI's error envelope, never a 500 or a hang."""

from __future__ import annotations

import pytest

from tests.conftest import SMALL_CTX_MODEL


def assert_error(r, status: int, *, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    assert contains in err["message"]
    return err


def test_malformed_json(client):
    r = client.post(
        "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, contains="JSON")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "stop": ["s"] * 65}, "stop"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ],
)
def test_bad_completion_fields(client, body, param):
    err = assert_error(client.post("/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"].startswith(param)


def test_bad_chat_fields(client):
    assert_error(client.post("/v1/chat/completions", json={"messages": []}), 400, param="messages")
    assert_error(
        client.post(
            "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]}
        ),
        400,
    )
    assert_error(
        client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        ),
        400,
        param="max_tokens",
    )


def test_unknown_model_is_404(client):
    err = assert_error(
        client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, param="model"
    )
    assert err["code"] == "model_not_found"
    assert_error(client.get("/v1/models/gpt-9"), 404)


def test_prompt_longer_than_context_is_400_with_counts(client):
    r = client.post("/v1/completions", json={"model": SMALL_CTX_MODEL, "prompt": "word " * 600})
    err = assert_error(r, 400, param="prompt", contains="512")
    assert err["code"] == "context_length_exceeded"
    assert "601" in err["message"] or "600" in err["message"]


def test_out_of_range_token_ids(client):
    assert_error(
        client.post("/v1/completions", json={"prompt": [1, 2, 10**7]}), 400, param="prompt"
    )


def test_suffix_on_a_model_without_fim_tokens(client):
    assert_error(
        client.post("/v1/completions", json={"prompt": "a", "suffix": "b"}), 400, param="suffix"
    )


def test_unknown_route_in_error_shape(client):
    assert_error(client.get("/v1/nothing-here"), 404)


def test_server_still_serves_after_errors(client):
    r = client.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 2})
    assert r.status_code == 200
