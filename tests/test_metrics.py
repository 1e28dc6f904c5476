"""/metrics: Prometheus text that parses, with counters that move by what a request did."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_by_a_known_request(client):
    model = "smollm2-135m"
    before = scrape(client)
    body = {
        "model": model,
        "prompt": "def metric_probe(x):\n",
        "max_tokens": 7,
        "temperature": 0,
        "repeat_penalty": 1.3,
    }
    usage = client.post("/v1/completions", json=body).json()["usage"]
    client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": -1})
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert delta("llamacpp:tokens_predicted_total", model=model) == usage["completion_tokens"]
    assert delta("llamacpp:prompt_tokens_total", model=model) == usage["prompt_tokens"] - cached
    assert delta("llamacpp:prompt_tokens_cached_total", model=model) == cached
    assert delta("llamacpp:tokens_predicted_seconds_total", model=model) > 0
    ok = dict(endpoint="/v1/completions", model=model, status="200")
    assert delta("codeserve_requests_total", **ok) == 1
    assert (
        delta("codeserve_requests_total", endpoint="/v1/completions", model="", status="400") == 1
    )
    assert delta("codeserve_time_to_first_token_seconds_count", model=model) == 1
    # A collected answer's text comes in one piece after its first token: no gaps to time...
    assert delta("codeserve_inter_token_latency_seconds_count", model=model) == 0
    # ...a streamed one has one between each pair of consecutive tokens that carried text.
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        frames = [line for line in r.iter_lines() if line.startswith("data: {")]
    gaps = value(scrape(client), "codeserve_inter_token_latency_seconds_count", model=model)
    gaps -= value(after, "codeserve_inter_token_latency_seconds_count", model=model)
    assert 0 < gaps <= usage["completion_tokens"] - 1
    assert len(frames) > 2


def test_live_gauges(client):
    samples = scrape(client)
    model = "smollm2-135m"
    assert value(samples, "llamacpp:requests_processing", model=model) == 0
    assert value(samples, "llamacpp:requests_deferred", model=model) == 0
    assert 0 < value(samples, "codeserve_kv_cache_usage_ratio", model=model) <= 1
    assert value(samples, "codeserve_model_memory_bytes", model=model) > 90 * 2**20
    assert value(samples, "codeserve_model_load_seconds", model=model) > 0
