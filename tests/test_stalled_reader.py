"""A client that stops reading its stream holds up nobody and loses nothing.

The batched engine waits, before a step, for its consumers to take the last step's frames
(EventSink.wait_taken). A client that stops reading must not stall the other streams, and gets
its whole stream when it reads again. Real model, real server, a raw socket with a small receive
window. (Its frames mostly land in the kernel's send buffer, which grows to megabytes on
loopback; a consumer that blocks outright is tests/test_scheduler.py's, with a fake engine.)
"""

from __future__ import annotations

import json
import socket
import time

from tests.conftest import LiveServer

TOKENS = 300


def _request(server: LiveServer, body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + raw


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(120)
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    return bytes(got)


def test_a_client_that_stops_reading_holds_up_no_other_stream_and_loses_nothing(
    server, openai_client
):
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    stalled.connect(("127.0.0.1", server.port))
    # Five alternatives per token: frames of ~300 bytes, some 90 KB in all.
    stalled.sendall(
        _request(
            server,
            {
                "prompt": "def parse(line):",
                "max_tokens": TOKENS,
                "ignore_eos": True,
                "temperature": 0,
                "logprobs": 5,
                "stream": True,
            },
        )
    )
    try:
        time.sleep(1.0)
        t0 = time.perf_counter()
        stream = openai_client.completions.create(
            model="smollm2-135m",
            prompt="def add(a, b):",
            max_tokens=48,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        elapsed = time.perf_counter() - t0
        assert sum(len(c.choices[0].text) for c in chunks) > 0
        assert chunks[-1].choices[0].finish_reason == "length"
        assert elapsed < 30, elapsed

        body = _read_all(stalled)  # reading again: the whole stream is there, well formed
    finally:
        stalled.close()
    # One HTTP chunk per SSE event, so no event is split by the chunked framing between them.
    lines = (line.strip() for line in body.split(b"\n"))
    events = [line[len(b"data: ") :] for line in lines if line.startswith(b"data: ")]
    assert body.startswith(b"HTTP/1.1 200") and events[-1] == b"[DONE]"
    frames = [json.loads(e) for e in events[:-1]]
    tokens = sum(
        len(c["logprobs"]["tokens"]) for f in frames for c in f["choices"] if c.get("logprobs")
    )
    assert tokens == TOKENS
    assert frames[-1]["choices"][0]["finish_reason"] == "length"
