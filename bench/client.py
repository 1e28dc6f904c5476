"""HTTP measurements that cost the harness (almost) nothing, identical for codeserve and its peers.

Each peer is reached over one persistent HTTP/1.1 connection per thread (the standard library's
``http.client``: no client object, connection pool or TLS context built per request, which for a
fresh ``httpx`` client costs tens of milliseconds). Times are taken when the bytes arrive, before
any JSON is parsed. ``check_overhead`` measures what the client itself spends per request (CPU
time of the calling thread, which excludes waiting on the socket) on a trivial endpoint, and
raises when that is 1 ms or more, so a slow harness can never pass for a slow server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_OVERHEAD_S = 1e-3


@dataclass(frozen=True)
class Sample:
    ttft_s: float  # request sent → first streamed text on the wire
    latency_s: float  # request sent → last byte
    # Generated tokens, and those of the first frame: counted with the model's vocabulary when
    # the caller gives one (a server may send several tokens to a frame), else frames.
    tokens: int
    prompt_tokens: int | None
    first_tokens: int = 1

    @property
    def decode_tok_s(self) -> float:
        span = self.latency_s - self.ttft_s
        after = self.tokens - self.first_tokens
        return after / span if after > 0 and span > 0 else float("nan")

    @classmethod
    def of(
        cls,
        ttft_s: float,
        latency_s: float,
        texts: list[str],
        prompt_tokens: int | None,
        count: Callable[[str], int] | None,
    ) -> Sample:
        """A stream whose frames carried ``texts``: tokens counted with ``count`` when given,
        else one per frame."""
        if count is None or not texts:
            return cls(ttft_s, latency_s, len(texts), prompt_tokens)
        return cls(ttft_s, latency_s, count("".join(texts)), prompt_tokens, count(texts[0]))


class HttpError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class HarnessTooSlow(RuntimeError):
    """The client's own cost per request would distort what it measures."""


class Connection:
    """One keep-alive connection to a server; reconnects once if the server closed it."""

    def __init__(self, base_url: str, timeout: float = 600):
        u = urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _send(self, method: str, path: str, body: dict | None) -> http.client.HTTPResponse:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                return self._conn.getresponse()
            except (ConnectionError, http.client.BadStatusLine):
                self.close()  # the server dropped an idle keep-alive connection
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        r = self._send(method, path, body)
        data = r.read()
        if r.will_close:
            self.close()
        return r.status, data

    def lines(self, path: str, body: dict) -> Iterator[tuple[float, bytes]]:
        """The response's lines as they arrive, each with its arrival time."""
        r = self._send("POST", path, body)
        if r.status != 200:
            data = r.read()
            if r.will_close:
                self.close()
            raise HttpError(r.status, f"POST {path}: HTTP {r.status}: {data[:500]!r}")
        done = False
        try:
            while line := r.readline():
                yield time.perf_counter(), line
            done = True
        finally:
            r.close()
            if r.will_close or not done:  # unread bytes would poison the next response
                self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


_local = threading.local()


def add_peer_options(ap: argparse.ArgumentParser) -> None:
    """``--url`` (repeated), ``--names`` and ``--model``: servers someone else started."""
    ap.add_argument("--url", action="append", required=True, help="a server; repeat for more")
    ap.add_argument("--names", help="comma list, one per --url (default: peer1, peer2, ...)")
    ap.add_argument("--model", default="smollm2-135m")


def peers(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """{name: url} from the options of `add_peer_options`, each server's client checked."""
    urls: list[str] = args.url
    names = args.names.split(",") if args.names else [f"peer{i + 1}" for i in range(len(urls))]
    if len(names) != len(urls):
        ap.error("--names needs one name per --url")
    for url in urls:
        check_overhead(url)
    return dict(zip(names, urls, strict=True))


def connection(url: str) -> Connection:
    """This thread's persistent connection to `url`."""
    pool: dict[str, Connection] = _local.__dict__.setdefault("pool", {})
    if url not in pool:
        pool[url] = Connection(url)
    return pool[url]


def sse_text(line: bytes) -> tuple[str, dict | None]:
    """An OpenAI stream line's text (every choice) and its event."""
    if not line.startswith(b"data: {"):
        return "", None
    event = json.loads(line[6:])
    return "".join(c.get("text") or "" for c in event.get("choices", [])), event


TextOf = Callable[[bytes], tuple[str, dict | None]]


def stream_text(
    url: str,
    path: str,
    body: dict,
    text_of: TextOf,
    timeout: float = 300,
    count: Callable[[str], int] | None = None,
) -> Sample:
    """A streamed request; `text_of(line)` gives a line's generated text and parsed event.

    TTFT is when the first line carrying text arrived; latency when the last byte did. With
    `count` (a vocabulary's token count of generated text) tokens are counted in the text, else
    one per frame.
    """
    conn = connection(url)
    conn.timeout = timeout
    first, prompt_tokens = None, None
    texts: list[str] = []
    t0 = time.perf_counter()
    end = t0
    for arrived, line in conn.lines(path, body):
        end = arrived
        text, event = text_of(line)
        if event and event.get("usage"):
            prompt_tokens = event["usage"]["prompt_tokens"]
        if text:
            texts.append(text)
            if first is None:
                first = arrived - t0
    latency = end - t0
    return Sample.of(first if first is not None else latency, latency, texts, prompt_tokens, count)


def stream(
    url: str, body: dict, timeout: float = 300, count: Callable[[str], int] | None = None
) -> Sample:
    """One streamed /v1/completions request: TTFT and latency from the wire."""
    return stream_text(url, "/v1/completions", {**body, "stream": True}, sse_text, timeout, count)


def post(url: str, path: str, body: dict, timeout: float = 600) -> dict:
    conn = connection(url)
    conn.timeout = timeout
    status, data = conn.request("POST", path, body)
    if status != 200:
        raise HttpError(status, f"POST {path}: HTTP {status}: {data[:500]!r}")
    return json.loads(data)


def overhead(get: Callable[[], object], rounds: int = 50) -> dict:
    """The client's own cost of one request: median CPU seconds of the calling thread (and the
    median wall time for reference), over `rounds` calls of ``get()`` after one warm-up."""
    get()
    cpu, wall = [], []
    for _ in range(rounds):
        c0, w0 = time.thread_time(), time.perf_counter()
        get()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall)}


def check_overhead(url: str, path: str = "/health", limit_s: float = MAX_OVERHEAD_S) -> dict:
    """Measure this client on a trivial endpoint of `url`; raise HarnessTooSlow at `limit_s`."""
    conn = connection(url)

    def get() -> None:
        status, _ = conn.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {url}{path}: HTTP {status}")

    out = overhead(get)
    if out["cpu_s"] >= limit_s:
        raise HarnessTooSlow(
            f"the benchmark client spends {out['cpu_s'] * 1e3:.2f} ms of its own per request "
            f"(GET {url}{path}; limit {limit_s * 1e3:.2f} ms): its figures would measure the "
            "harness, not the server"
        )
    return out


def concurrent_throughput(
    url: str,
    bodies: list[dict],
    streams: int,
    requests: int,
    count: Callable[[str], int] | None = None,
) -> dict:
    """Aggregate generated tokens/s with `streams` clients issuing `requests` in total.

    Tokens are the answers' text counted by ``count`` where given, else the server's
    ``completion_tokens``, which llama-server makes one larger for an answer that ended on the
    end-of-generation token (it counts that token; codeserve and OpenAI count the text's)."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = 0

    def client() -> None:
        nonlocal tokens
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            out = post(url, "/v1/completions", bodies[i % len(bodies)])
            with lock:
                latencies.append(time.perf_counter() - t0)
                if count is None:
                    tokens += out["usage"]["completion_tokens"]
                else:
                    tokens += sum(count(c["text"]) for c in out["choices"])

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
