"""OpenAI-compatible HTTP client measurements, identical for codeserve and its peers."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Sample:
    ttft_s: float  # request sent → first streamed text
    latency_s: float  # request sent → last byte
    tokens: int  # streamed text chunks: one per token on every server measured
    prompt_tokens: int | None

    @property
    def decode_tok_s(self) -> float:
        span = self.latency_s - self.ttft_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


def stream(url: str, body: dict, timeout: float = 300) -> Sample:
    body = {**body, "stream": True}
    t0 = time.perf_counter()
    first, tokens, prompt_tokens = None, 0, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter() - t0
    end = time.perf_counter() - t0
    return Sample(first if first is not None else end, end, tokens, prompt_tokens)


def concurrent_throughput(url: str, bodies: list[dict], streams: int, requests: int) -> dict:
    """Aggregate generated tokens/s with `streams` clients issuing `requests` in total."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = 0

    def client() -> None:
        nonlocal tokens
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = c.post(url + "/v1/completions", json=bodies[i % len(bodies)])
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        for f in [pool.submit(client) for _ in range(streams)]:
            f.result()
    wall = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "latencies_s": latencies,
    }
