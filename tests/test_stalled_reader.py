"""A client that stops reading its stream holds up nobody and loses nothing.

The batched engine waits, before a step, for its consumers to take the last step's frames
(EventSink.wait_taken). A client that stops reading must not stall the other streams, and gets
its whole stream when it reads again. Real model, real server, a raw socket with a small receive
window. (Its frames mostly land in the kernel's send buffer, which grows to megabytes on
loopback; a consumer that blocks outright is tests/test_scheduler.py's, with a fake engine.)
"""

from __future__ import annotations

import http.client
import json
import socket
import time

TOKENS = 300


def test_a_client_that_stops_reading_holds_up_no_other_stream_and_loses_nothing(
    server, openai_client
):
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    stalled.connect(("127.0.0.1", server.port))
    stalled.settimeout(120)
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.sock = stalled  # http.client uses the connected socket as it is
    # Five alternatives per token: frames of ~300 bytes, some 90 KB in all.
    body = {
        "prompt": "def parse(line):",
        "max_tokens": TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "logprobs": 5,
        "stream": True,
    }
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
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

        response = conn.getresponse()  # reading again: the whole stream is there, well formed
        status, text = response.status, response.read()
    finally:
        conn.close()
    lines = (line.strip() for line in text.split(b"\n"))
    events = [line[len(b"data: ") :] for line in lines if line.startswith(b"data: ")]
    assert status == 200 and events[-1] == b"[DONE]"
    frames = [json.loads(e) for e in events[:-1]]
    tokens = sum(
        len(c["logprobs"]["tokens"]) for f in frames for c in f["choices"] if c.get("logprobs")
    )
    assert tokens == TOKENS
    assert frames[-1]["choices"][0]["finish_reason"] == "length"
