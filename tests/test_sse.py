"""server.api.sse: frames encoded by hand are the bytes sse-starlette would have sent."""

from __future__ import annotations

import json

import pytest
from sse_starlette.event import ensure_bytes

from server.api.sse import data_frame, event_frame


@pytest.mark.parametrize(
    "payload",
    [
        "[DONE]",
        json.dumps({"choices": [{"text": "def f():\n\treturn 'é'"}]}, separators=(",", ":")),
        json.dumps({"content": "naïve — ✓"}, ensure_ascii=False),
    ],
)
def test_frames_match_sse_starlettes_encoding(payload):
    assert data_frame(payload) == ensure_bytes({"data": payload}, "\n")
    assert event_frame("response.output_text.delta", payload) == ensure_bytes(
        {"event": "response.output_text.delta", "data": payload}, "\n"
    )


def test_a_lone_surrogate_does_not_break_a_frame():
    # A request may carry "\ud800" (valid JSON), and an error message may echo it.
    text = json.dumps(
        {"error": {"message": "bad \ud800"}}, ensure_ascii=False, separators=(",", ":")
    )
    assert data_frame(text) == b'data: {"error":{"message":"bad ?"}}\n\n'
