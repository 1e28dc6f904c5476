"""llama-server's native API as its clients call it: llama.vscode's request bodies, the stream's
framing and the error shape, shared by the tests of /infill and of the other native routes."""

from __future__ import annotations

import json

import httpx

PREFIX = "import math\n\n\ndef circle_area(radius):\n    "
SUFFIX = "\n\n\ndef main():\n    print(circle_area(2.0))\n"
CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"
# llama.vscode's ring-buffer chunks: {text, time, filename} (src/extra-context.ts).
CHUNKS = [
    {"text": "def helper(x):\n    return x * 2\n", "time": 1732269000000, "filename": "/p/util.py"},
    {"text": "RADIUS = 3.0\n", "time": 1732269001000, "filename": "/p/consts.py"},
]


def vscode_infill(prefix: str, suffix: str, prompt: str, nindent: int) -> dict:
    """llama.vscode's /infill body, field for field (src/llama-server.ts createRequestPayload)."""
    return {
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": CHUNKS,
        "prompt": prompt,
        "n_predict": 128,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
        "n_indent": nindent,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 500,
    }


def vscode_warmup(prefix: str = "", suffix: str = "", prompt: str = "") -> dict:
    """llama.vscode's cache warm-up (createRequestPayload with noPredict)."""
    return {
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": CHUNKS,
        "prompt": prompt,
        "n_predict": 0,
        "samplers": [],
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1,
    }


def sse_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """The `data:` payloads of a native stream, asserting llama-server's framing (no [DONE])."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines and all(ln != "data: [DONE]" for ln in lines)
    return [json.loads(ln.removeprefix("data: ")) for ln in lines]


def assert_llama_error(r: httpx.Response, status: int, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "type"}, err
    assert err["code"] == status and err["message"] and err["type"]
    assert contains in err["message"], err
    return err
