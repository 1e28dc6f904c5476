"""llama-server's native API on the real model, as Continue and Tabby call it: /completion, the
tokenizer, /props and /slots, and bad input in its error shape (/infill:
tests/test_api_llamacpp_infill.py)."""

from __future__ import annotations

import logging
import time

import pytest

from server.core.line_rules import IndentFloor
from tests.conftest import SMALL_CTX_MODEL
from tests.llamacpp_client import (
    CODE,
    PREFIX,
    SUFFIX,
    assert_llama_error,
    sse_events,
    vscode_infill,
)
from tests.test_api_serving import request_lines

# -- /completion: Continue, Tabby ------------------------------------------------------------


def test_completion_non_streamed(client):
    r = client.post("/completion", json={"prompt": CODE, "n_predict": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["content"] and out["stop"] is True
    assert out["tokens_predicted"] <= 16 and out["stop_type"] in ("eos", "limit")
    assert set(out["timings"]) >= {
        "prompt_n",
        "prompt_ms",
        "prompt_per_second",
        "predicted_n",
        "predicted_ms",
        "predicted_per_second",
    }
    assert out["generation_settings"]["n_predict"] == 16
    assert out["generation_settings"]["temperature"] == 0


def test_completion_stream_matches_non_streamed(client):
    body = {"prompt": CODE, "n_predict": 24, "temperature": 0}
    whole = client.post("/completion", json=body).json()
    events = sse_events(client, "/completion", {**body, "stream": True})
    text = "".join(e["content"] for e in events)
    assert text == whole["content"]
    last = events[-1]
    assert last["stop"] is True and last["content"] == ""
    assert last["stop_type"] == whole["stop_type"]
    assert last["tokens_predicted"] == whole["tokens_predicted"]
    for e in events[:-1]:
        assert set(e) >= {"index", "content", "tokens", "stop", "tokens_predicted"}


def test_stop_word(client):
    body = {"prompt": CODE, "n_predict": 24, "temperature": 0, "return_tokens": True}
    free = client.post("/completion", json=body).json()
    ids = free["tokens"]
    head = client.post("/detokenize", json={"tokens": ids[:3]}).json()["content"]
    stop = client.post("/detokenize", json={"tokens": ids[3:5]}).json()["content"]
    assert free["content"].find(stop) == len(head), (free["content"], stop)
    for stream in (False, True):
        req = {**body, "stop": [stop], "stream": stream}
        if stream:
            events = sse_events(client, "/completion", req)
            out = events[-1] | {"content": "".join(e["content"] for e in events)}
        else:
            out = client.post("/completion", json=req).json()
        assert out["content"] == head
        assert (out["stop_type"], out["stopping_word"]) == ("word", stop)


def test_continue_llamacpp_provider_request(client):
    # Continue's core/llm/llms/LlamaCpp.ts: model, prompt, stream, then its converted options.
    body = {
        "model": "smollm2-135m",
        "prompt": "# print hello\n",
        "stream": True,
        "n_predict": 20,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "min_p": 0.05,
        "stop": ["\n\n"],
        "top_k": 40,
        "top_p": 0.95,
        "temperature": 0.01,
    }
    events = sse_events(client, "/completion", body)
    assert events[-1]["stop"] is True
    assert "\n\n" not in "".join(e["content"] for e in events)


def test_tabby_request(client):
    # Tabby's http-api-bindings llama.rs: seed, prompt, n_predict, temperature, stream, and
    # penalty_last_n, which llama-server does not know (ignored there, ignored here).
    body = {
        "seed": 12345678901,
        "prompt": "def greet(name):\n",
        "n_predict": 12,
        "temperature": 0.1,
        "stream": True,
        "penalty_last_n": 0,
        "presence_penalty": 0.0,
    }
    events = sse_events(client, "/completion", body)
    assert all(isinstance(e["content"], str) and isinstance(e["stop"], bool) for e in events)
    assert events[-1]["stop"] is True


def test_prompt_as_token_ids_and_seed(client):
    ids = client.post("/tokenize", json={"content": CODE}).json()["tokens"]
    body = {"prompt": ids, "n_predict": 10, "temperature": 0.9, "seed": 42}
    a = client.post("/completion", json=body).json()
    b = client.post("/completion", json=body).json()
    assert a["content"] == b["content"] and a["tokens_evaluated"] == len(ids)


def test_n_probs(client):
    body = {"prompt": CODE, "n_predict": 4, "temperature": 0, "n_probs": 3, "return_tokens": True}
    out = client.post("/completion", json=body).json()
    probs = out["completion_probabilities"]
    assert [p["id"] for p in probs] == out["tokens"]
    assert all(len(p["top_logprobs"]) == 3 and p["logprob"] <= 0 for p in probs)


def test_logit_bias_bans_a_token(client):
    body = {"prompt": CODE, "n_predict": 6, "temperature": 0, "return_tokens": True}
    free = client.post("/completion", json=body).json()
    first = free["tokens"][0]
    for bias in ([[first, False]], {str(first): -1000}):
        out = client.post("/completion", json={**body, "logit_bias": bias}).json()
        assert out["tokens"][0] != first
        assert out["generation_settings"]["logit_bias"][0]["token"] == first


def test_ignore_eos_runs_to_n_predict(fim):
    body = {**vscode_infill(PREFIX, SUFFIX, "", 0), "n_predict": 8, "temperature": 0}
    body["samplers"] = ["temperature"]
    del body["t_max_predict_ms"]  # 500 ms could cut the eight tokens on a loaded machine
    free = fim.post("/infill", json=body).json()
    assert free["stop_type"] == "eos" and free["tokens_predicted"] < 8
    out = fim.post("/infill", json={**body, "ignore_eos": True}).json()
    assert out["tokens_predicted"] == 8 and out["stop_type"] == "limit"


def test_grammar(client):
    body = {"prompt": "Is water wet? Answer:", "n_predict": 8, "grammar": 'root ::= " yes" | " no"'}
    for stream in (False, True):
        if stream:
            events = sse_events(client, "/completion", {**body, "stream": True})
            text = "".join(e["content"] for e in events)
        else:
            text = client.post("/completion", json=body).json()["content"]
        assert text in (" yes", " no")


def test_n_indent_cuts_where_llama_server_does(client):
    body = {"prompt": CODE, "n_predict": 48, "temperature": 0}
    free = client.post("/completion", json=body).json()["content"]
    cut, _ = IndentFloor(4).check(free, 0.0)
    assert cut is not None, f"the reference completion never dedents: {free!r}"
    out = client.post("/completion", json={**body, "n_indent": 4}).json()
    assert out["content"] == free[:cut]
    assert out["stop_type"] == "limit"
    events = sse_events(client, "/completion", {**body, "n_indent": 4, "stream": True})
    assert "".join(e["content"] for e in events) == free[:cut]


def test_t_max_predict_ms_stops_at_a_line_end(client):
    body = {"prompt": "def f():\n", "n_predict": 400, "temperature": 0.8, "t_max_predict_ms": 1}
    out = client.post("/completion", json=body).json()
    assert out["stop_type"] in ("limit", "eos")
    if out["stop_type"] == "limit" and out["tokens_predicted"] < 400:
        assert out["content"].endswith("\n") or "\n" in out["content"]


def test_disconnect_frees_the_slot(client, caplog):
    caplog.set_level(logging.INFO, logger="codeserve.requests")
    body = {
        "prompt": "def long_function():\n",
        "n_predict": 3000,
        "stream": True,
        "ignore_eos": True,
    }
    with client.stream("POST", "/completion", json=body) as r:
        for n, _ in enumerate(ln for ln in r.iter_lines() if ln.startswith("data: ")):
            if n == 2:
                break
    t0 = time.perf_counter()
    r = client.post("/completion", json={"prompt": "x = ", "n_predict": 4})
    assert r.status_code == 200 and time.perf_counter() - t0 < 5
    cancelled = [m for m in request_lines(caplog) if "outcome=cancelled" in m]
    assert cancelled and int(cancelled[0].split("completion_tokens=")[1].split()[0]) < 100


# -- tokenizer, props, slots -----------------------------------------------------------------


def test_tokenize_detokenize_round_trip(client):
    text = "def f(x):\n    return x  # ünïcode\n"
    ids = client.post("/tokenize", json={"content": text}).json()["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"content": text}
    pieces = client.post("/tokenize", json={"content": "def f", "with_pieces": True}).json()
    assert "".join(p["piece"] for p in pieces["tokens"]) == "def f"
    assert [p["id"] for p in pieces["tokens"]] == client.post(
        "/tokenize", json={"content": "def f"}
    ).json()["tokens"]
    marker = client.post("/tokenize", json={"content": "<|im_start|>"}).json()["tokens"]
    as_text = client.post(
        "/tokenize", json={"content": "<|im_start|>", "parse_special": False}
    ).json()["tokens"]
    assert len(marker) == 1 and len(as_text) > 1


def test_props_and_slots(client, fim):
    props = client.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] > 0
    assert props["total_slots"] >= 1 and props["infill"] is False
    assert props["default_generation_settings"]["params"]["temperature"] == 0.8
    assert fim.get("/props").json()["infill"] is True
    slots = client.get("/slots").json()
    assert len(slots) == props["total_slots"]
    assert all(isinstance(s["is_processing"], bool) and s["n_ctx"] > 0 for s in slots)
    assert (
        client.get("/props", params={"model": SMALL_CTX_MODEL}).json()[
            "default_generation_settings"
        ]["n_ctx"]
        == 512
    )


# -- bad input: 4xx in llama-server's error shape --------------------------------------------


@pytest.mark.parametrize(
    "path, body, contains",
    [
        ("/completion", {}, "prompt"),
        ("/completion", {"prompt": 5}, "prompt"),
        ("/completion", {"prompt": ["a", "b"]}, "prompt"),
        ("/completion", {"prompt": [-1, 2]}, "prompt"),
        ("/completion", {"prompt": "x", "n_predict": -2}, "n_predict"),
        ("/completion", {"prompt": "x", "grammar": "root ::= undefined-rule"}, "grammar"),
        ("/completion", {"prompt": "x", "json_schema": {"type": "object"}}, "json_schema"),
        ("/completion", {"prompt": "x", "mirostat": 2}, "mirostat"),
        ("/completion", {"prompt": "x", "samplers": ["top_k", "bogus"]}, "samplers"),
        ("/completion", {"prompt": "x", "samplers": ["temperature", "top_k"]}, "samplers"),
        ("/completion", {"prompt": "x", "samplers": "kq"}, "samplers"),
        ("/completion", {"prompt": "x", "typical_p": 0.5}, "typical_p"),
        ("/completion", {"prompt": "x", "logit_bias": [[10**9, 1]]}, "logit_bias"),
        ("/completion", {"prompt": "x", "logit_bias": {"5": "high"}}, "logit_bias"),
        ("/completion", {"prompt": "x", "repeat_penalty": 1.2, "repeat_last_n": 8}, "repeat"),
        ("/completion", {"prompt": "x", "lora": [{"id": 0, "scale": 0.5}]}, "lora"),
        ("/completion", {"prompt": "x", "stop": 3}, "stop"),
        ("/completion", {"prompt": "x", "model": "nope"}, "nope"),
        ("/infill", {"input_prefix": "a"}, "input_suffix"),
        ("/infill", {"input_prefix": "a", "input_suffix": "b", "prompt": 3}, "prompt"),
        ("/infill", {"input_prefix": "a", "input_suffix": "b", "input_extra": "x"}, "input_extra"),
        ("/infill", {"input_prefix": "a", "input_suffix": "", "input_extra": [{}]}, "input_extra"),
        ("/tokenize", {"content": 5}, "content"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_bad_input(fim, path, body, contains):
    r = fim.post(path, json=body)
    assert r.status_code in (400, 404), r.text
    assert_llama_error(r, r.status_code, contains=contains)


def test_bad_input_on_get_routes_and_malformed_json(client):
    assert_llama_error(client.get("/props", params={"model": "nope"}), 404)
    assert_llama_error(client.get("/slots", params={"model": "nope"}), 404)
    r = client.post(
        "/completion", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert_llama_error(r, 400, contains="JSON")
    assert client.get("/health").json()["status"] == "ok"  # /health keeps its own shape
