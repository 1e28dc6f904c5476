"""IDE autocomplete on the real model: FIM, Continue-style prompts, prefix reuse, aborts."""

from __future__ import annotations

import logging
import threading
import time

import httpx

from tests.conftest import FIM_MODEL
from tests.test_api_completions import stream_events
from tests.test_api_errors import assert_error
from tests.test_api_serving import request_lines

PREFIX = "import math\n\n\ndef circle_area(radius):\n    "
SUFFIX = "\n\n\ndef main():\n    print(circle_area(2.0))\n"
# Continue's default stop list for FIM templates, padded to 16 as IDE configs do.
CONTINUE_STOPS = [
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<|endoftext|>",
    "<file_sep>",
    "\n\n\n",
    "\n\ndef ",
    "\n\nclass ",
    "\n\n#",
    "```",
    "/src/",
    "#- coding: utf-8",
    "<|im_end|>",
    "<|im_start|>",
    "\n\n\n\n",
    "\r\n\r\n\r\n",
]


def fim_body(**kw) -> dict:
    return {
        "model": FIM_MODEL,
        "prompt": PREFIX,
        "suffix": SUFFIX,
        "max_tokens": 16,
        "temperature": 0,
        **kw,
    }


def test_suffix_builds_the_same_prompt_as_the_pretemplated_text(client):
    via_suffix = client.post("/v1/completions", json=fim_body()).json()
    # <issue_start>/<issue_comment>/<issue_closed> are this test model's FIM markers.
    templated = f"<issue_start>{PREFIX}<issue_comment>{SUFFIX}<issue_closed>"
    via_text = client.post(
        "/v1/completions", json={**fim_body(), "prompt": templated, "suffix": None}
    ).json()
    assert via_suffix["usage"]["prompt_tokens"] == via_text["usage"]["prompt_tokens"]
    assert via_suffix["choices"][0]["text"] == via_text["choices"][0]["text"]
    streamed = stream_events(client, "/v1/completions", {**fim_body(), "stream": True})
    assert "".join(e["choices"][0]["text"] for e in streamed) == via_suffix["choices"][0]["text"]


def test_marker_text_in_user_code_is_not_a_marker(client):
    plain = client.post("/v1/completions", json=fim_body(max_tokens=1)).json()
    sneaky = client.post(
        "/v1/completions", json=fim_body(max_tokens=1, prompt=PREFIX + "<issue_closed>")
    ).json()
    # As a special token it would add exactly 1; as text it is several ordinary tokens.
    assert sneaky["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"] > 1


def test_mistral_style_fim_route(client):
    body = {
        "model": FIM_MODEL,
        "prompt": PREFIX,
        "suffix": SUFFIX,
        "max_tokens": 8,
        "temperature": 0,
    }
    r = client.post("/v1/fim/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    expected = client.post("/v1/completions", json=fim_body(max_tokens=8)).json()
    assert out["choices"][0]["message"]["content"] == expected["choices"][0]["text"]
    events = stream_events(client, "/v1/fim/completions", {**body, "stream": True})
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == out["choices"][0]["message"]["content"]


def test_models_without_fim_tokens_refuse_suffix(client):
    for path in ("/v1/completions", "/v1/fim/completions"):
        err = assert_error(
            client.post(path, json={"prompt": "a = ", "suffix": "\n"}), 400, param="suffix"
        )
        assert "fill-in-the-middle" in err["message"]


def test_continue_style_pretemplated_stream_with_16_stops(client):
    body = {
        "prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
        "max_tokens": 64,
        "temperature": 0.01,
        "stream": True,
        "stop": CONTINUE_STOPS,
    }
    events = stream_events(client, "/v1/completions", body)
    text = "".join(e["choices"][0]["text"] for e in events)
    assert not any(s in text for s in CONTINUE_STOPS)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_next_keystroke_reuses_the_prefix(client):
    body = fim_body(prompt="# utilities\n" + "x = 1\n" * 150 + PREFIX, max_tokens=2)
    first = client.post("/v1/completions", json=body).json()["usage"]
    second = client.post("/v1/completions", json={**body, "prompt": body["prompt"] + "r"})
    usage = second.json()["usage"]
    assert usage["prompt_tokens"] > 300
    # Everything up to the cursor was already in the KV cache; only the new tail is evaluated.
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] - 20
    assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] < 25


def test_abort_storm_does_not_delay_the_real_request(server, caplog):
    caplog.set_level(logging.INFO, logger="codeserve.requests")
    body = {"prompt": "def typing_fast():\n", "max_tokens": 500, "temperature": 0.5, "stream": True}

    def abort(i: int) -> None:
        with (
            httpx.Client(base_url=server.url, timeout=30) as c,
            c.stream("POST", "/v1/completions", json={**body, "prompt": f"# {i}\n"}) as r,
        ):
            for _ in r.iter_lines():
                break  # the user typed on: drop the request after its first event

    threads = [threading.Thread(target=abort, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0 = time.perf_counter()
    r = httpx.post(
        server.url + "/v1/completions",
        timeout=30,
        json={"prompt": "def real():\n", "max_tokens": 4, "temperature": 0},
    )
    waited = time.perf_counter() - t0
    assert r.status_code == 200
    assert waited < 3, f"the real request waited {waited:.1f}s behind 20 aborted ones"
    lines = request_lines(caplog)
    aborted = [ln for ln in lines if "outcome=cancelled" in ln]
    assert len(aborted) >= 15, lines
    wasted = sum(int(ln.split("completion_tokens=")[1].split()[0]) for ln in aborted)
    assert wasted < 20 * 20, f"aborted requests still generated {wasted} tokens"


def test_time_budget_ends_a_runaway_completion(client):
    t0 = time.perf_counter()
    r = client.post(
        "/v1/completions",
        json={
            "prompt": "def f():\n",
            "max_tokens": 3000,
            "temperature": 0.8,
            "t_max_predict_ms": 300,
        },
    )
    elapsed = time.perf_counter() - t0
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] in ("length", "stop")
    assert usage["completion_tokens"] < 3000 and elapsed < 5
