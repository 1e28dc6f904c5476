"""/v1/chat/completions on the real model: the GGUF's chat template, streaming, limits."""

from __future__ import annotations

from tests.test_api_completions import stream_events

MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def test_chat_with_openai_sdk(openai_client):
    out = openai_client.chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, max_tokens=48, temperature=0
    )
    assert out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert "<|im_end|>" not in msg.content  # end-of-turn is a stop, not text
    assert out.usage.completion_tokens <= 48


def test_chat_stream_matches_non_streamed(client):
    body = {"messages": MESSAGES, "max_tokens": 40, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    events = stream_events(
        client,
        "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_chat_stream_with_openai_sdk(openai_client):
    stream = openai_client.chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_max_completion_tokens(client):
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_completion_tokens": 5})
    assert r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_content_parts_and_system_message(client):
    messages = [
        {"role": "system", "content": "You answer with one word."},
        {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
    ]
    r = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0}
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"]


def test_chat_stop_and_seed(client):
    body = {"messages": MESSAGES, "max_tokens": 40, "temperature": 0.8, "seed": 99}
    a = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    b = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert a == b
    stop = a.split()[2] if len(a.split()) > 2 else a[-3:]
    out = client.post("/v1/chat/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert out["finish_reason"] == "stop"
    assert stop not in out["message"]["content"]
