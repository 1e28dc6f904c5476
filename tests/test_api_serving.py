"""Scheduling behaviour on the real model: disconnects, concurrency, queue bound, auth, health."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import LiveServer, make_settings
from tests.test_api_errors import assert_error

# ignore_eos: a sampled answer ended within 70 tokens about one run in 15, freeing the slot early.
LONG = {
    "prompt": "def long_function():\n",
    "max_tokens": 3000,
    "temperature": 0.7,
    "stream": True,
    "ignore_eos": True,
}


def request_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "codeserve.requests"]


def test_health_and_models(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert "smollm2-135m" in ids and "qwen2.5-coder-1.5b" in ids
    assert client.get("/v1/models/smollm2-135m").json()["id"] == "smollm2-135m"


def test_disconnect_mid_stream_frees_the_model(client, caplog):
    caplog.set_level(logging.INFO, logger="codeserve.requests")
    with client.stream("POST", "/v1/completions", json=LONG) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                break  # closing the response drops the connection
    t0 = time.perf_counter()
    r = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 4})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200
    # The abandoned request would take ~30 s to reach 3000 tokens; its cancellation must be prompt.
    assert elapsed < 5, f"next request waited {elapsed:.1f}s behind a cancelled stream"
    cancelled = [m for m in request_lines(caplog) if "outcome=cancelled" in m]
    assert cancelled, request_lines(caplog)
    tokens = int(cancelled[0].split("completion_tokens=")[1].split()[0])
    assert tokens < 100


def test_concurrent_clients_are_all_answered(server):
    def ask(i: int) -> dict:
        r = httpx.post(
            server.url + "/v1/completions",
            timeout=120,
            json={
                "prompt": f"# Task {i}: print the number {i}\n",
                "max_tokens": 12,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    assert all(r["choices"][0]["text"] for r in results)
    assert len({r["id"] for r in results}) == 6


@pytest.fixture(scope="module")
def guarded_server(registry):
    """A second server: API key required, one request at a time and room for one waiting."""
    live = LiveServer(make_settings(api_key="sekret", queue_size=1, slots=1), registry).start()
    yield live
    live.stop()


def test_api_key_required_on_v1(guarded_server):
    url = guarded_server.url
    body = {"prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(url + "/v1/completions", json=body), 401)
    err = assert_error(
        httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}),
        401,
    )
    assert err["code"] == "invalid_api_key"
    ok = httpx.post(
        url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekret"}, timeout=60
    )
    assert ok.status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_full_queue_answers_429(guarded_server):
    auth = {"Authorization": "Bearer sekret"}
    started, release = threading.Event(), threading.Event()
    with httpx.Client(base_url=guarded_server.url, headers=auth, timeout=60) as busy:

        def hold_the_worker():
            with busy.stream("POST", "/v1/completions", json=LONG) as r:
                for _ in r.iter_lines():
                    started.set()
                    if release.is_set():
                        break

        holder = threading.Thread(target=hold_the_worker)
        holder.start()
        assert started.wait(30)
        # One request may wait; the worker is busy, so this one fills the queue...
        waiting = threading.Thread(
            target=lambda: httpx.post(
                guarded_server.url + "/v1/completions",
                headers=auth,
                timeout=60,
                json={"prompt": "y", "max_tokens": 1},
            )
        )
        waiting.start()
        time.sleep(0.5)
        # ...and the next is turned away at once.
        t0 = time.perf_counter()
        r = httpx.post(
            guarded_server.url + "/v1/completions",
            headers=auth,
            timeout=60,
            json={"prompt": "z", "max_tokens": 1},
        )
        assert time.perf_counter() - t0 < 2
        release.set()
        err = assert_error(r, 429)
        assert err["type"] == "rate_limit_error"
        holder.join()
        waiting.join()
