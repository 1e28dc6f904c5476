"""/v1/completions on the real model, through the openai SDK and raw HTTP."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import SMALL_CTX_MODEL

PROMPT = "def fibonacci(n):\n"


def stream_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """The parsed `data:` payloads of an SSE response, asserting OpenAI's framing."""
    events = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        events.append(json.loads(ln.removeprefix("data: ")))
    return events


def test_completion_with_openai_sdk(openai_client):
    out = openai_client.completions.create(
        model="smollm2-135m", prompt=PROMPT, max_tokens=24, temperature=0
    )
    assert out.object == "text_completion"
    assert out.model == "smollm2-135m"
    assert out.choices[0].text.strip()
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_default_model_when_none_named(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 200
    assert r.json()["model"] == "smollm2-135m"


def test_stream_reassembles_to_non_streamed_text(client):
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    events = stream_events(client, "/v1/completions", {**body, "stream": True})
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == whole["text"]
    reasons = [e["choices"][0]["finish_reason"] for e in events]
    assert reasons[-1] == whole["finish_reason"] and set(reasons[:-1]) == {None}


def test_stream_include_usage(client):
    body = {
        "prompt": PROMPT,
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = stream_events(client, "/v1/completions", body)
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 5


def test_max_tokens_gives_length(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3


def test_stop_strings_are_honoured_and_not_returned(client):
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 40, "temperature": 0}
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert " 9" in free  # the model counts on; the stop below is something it will produce
    stops = [f"never-{i}" for i in range(15)] + [" 9"]
    out = client.post("/v1/completions", json={**body, "stop": stops}).json()["choices"][0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == free[: free.index(" 9")]
    streamed = stream_events(client, "/v1/completions", {**body, "stop": stops, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in streamed) == out["text"]
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_as_single_string(client):
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 40, "temperature": 0, "stop": "8"}
    out = client.post("/v1/completions", json=body).json()["choices"][0]
    assert "8" not in out["text"] and out["finish_reason"] == "stop"


def test_same_seed_same_text(client):
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.9, "seed": 1234}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    client.post("/v1/completions", json={**body, "prompt": "Something else entirely"})
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b
    texts = {
        client.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0]["text"]
        for s in (1, 2, 3)
    }
    assert len(texts) > 1, "different seeds should sample different text"


def test_prompt_as_token_ids(client):
    echoed = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "echo": True})
    assert echoed.json()["choices"][0]["text"].startswith(PROMPT)
    # 1604 803 24 81 28 278 727 is "def add(a, b):" in SmolLM2's vocabulary.
    r = client.post(
        "/v1/completions",
        json={"prompt": [1604, 803, 24, 81, 28, 278, 727], "max_tokens": 4, "echo": True},
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"].startswith("def add(a, b):")
    assert r.json()["usage"]["prompt_tokens"] == 7


def test_logprobs(client):
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    )
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0
    for tok, logprob, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert logprob <= 0 and len(top) == 3
        # greedy: the chosen token is the most likely one
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)
        assert tok in top


def test_n_choices(client):
    r = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 7},
    )
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)
    assert 2 <= r.json()["usage"]["completion_tokens"] <= 16


def test_unknown_fields_are_ignored(client):
    r = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 2, "best_of": 1, "some_vendor_field": {"x": 1}},
    )
    assert r.status_code == 200


def test_max_tokens_clamped_to_context(client):
    # Continue sends max_tokens=4096 whatever the context: clamp and finish with "length".
    prompt = "word " * 400
    r = client.post(
        "/v1/completions",
        json={
            "model": SMALL_CTX_MODEL,
            "prompt": prompt,
            "max_tokens": 4096,
            "temperature": 0,
            "repeat_penalty": 1.3,
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert body["usage"]["total_tokens"] <= 512
    if body["choices"][0]["finish_reason"] == "length":
        assert body["usage"]["total_tokens"] == 512
