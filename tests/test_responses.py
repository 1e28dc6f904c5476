"""/v1/responses (OpenAI's Responses API) on the real model, through the official openai SDK.

Request and answer shapes, streaming events, stored responses; tools and structured output are
tests/test_responses_tools.py.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import SMALL_CTX_MODEL

MODEL = "smollm2-135m"
QUESTION = "Write a Python function that reverses a string."


def sse_events(client, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) pairs of a raw /v1/responses stream, asserting OpenAI's framing."""
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith(("event: ", "data: "))]
    names = [ln.removeprefix("event: ") for ln in lines if ln.startswith("event: ")]
    datas = [json.loads(ln.removeprefix("data: ")) for ln in lines if ln.startswith("data: ")]
    assert len(names) == len(datas)
    for name, data in zip(names, datas, strict=True):
        assert data["type"] == name  # the event line names the payload's type
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    return list(zip(names, datas, strict=True))


def test_create_with_openai_sdk(openai_client):
    out = openai_client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=48, temperature=0
    )
    assert out.object == "response" and out.id.startswith("resp_")
    assert out.model == MODEL
    assert out.output_text.strip()
    assert "<|im_end|>" not in out.output_text
    (item,) = out.output
    assert item.type == "message" and item.role == "assistant"
    assert item.content[0].type == "output_text"
    u = out.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 48
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0
    assert out.status in ("completed", "incomplete")


def test_stream_with_openai_sdk_matches_non_streamed(openai_client):
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 40, "temperature": 0}
    whole = openai_client.responses.create(**body)
    events = list(openai_client.responses.create(**body, stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete",
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == events[-4].text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id


def test_stream_helper_final_response(openai_client):
    """The SDK's own accumulator (`responses.stream`) rebuilds the answer from our events."""
    with openai_client.responses.stream(
        model=MODEL, input="Say hello.", max_output_tokens=200, temperature=0
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == text


def test_raw_stream_framing(client):
    events = sse_events(client, {"input": "Hi!", "max_output_tokens": 8, "temperature": 0})
    assert events[0][0] == "response.created"
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_instructions_and_input_items(openai_client):
    out = openai_client.responses.create(
        model=MODEL,
        instructions="You answer with one word.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Capital of France?"}]},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert out.instructions == "You answer with one word."
    assert out.output_text.strip()


def test_instructions_are_the_system_message(openai_client):
    """`instructions` renders exactly as a leading system (or developer) message would."""
    body = {"model": MODEL, "max_output_tokens": 12, "temperature": 0}
    told = openai_client.responses.create(**body, input="Hi", instructions="Answer in French.")
    as_message = openai_client.responses.create(
        **body,
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hi"},
        ],
    )
    plain = openai_client.responses.create(**body, input="Hi")
    assert told.usage.input_tokens == as_message.usage.input_tokens
    assert told.output_text == as_message.output_text
    assert told.usage.input_tokens != plain.usage.input_tokens


def test_max_output_tokens_is_incomplete(openai_client):
    out = openai_client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=5, temperature=0
    )
    assert out.status == "incomplete"
    assert out.incomplete_details.reason == "max_output_tokens"
    assert out.usage.output_tokens == 5
    assert out.output[0].status == "incomplete"


def test_sampling_is_honoured(openai_client):
    # A question no earlier test cached: every request here then starts from the cells the
    # seeded (cold) requests computed, not from another test's cache of the same prompt, whose
    # cells a different batch shape computed (llama.cpp is not bit-exact across shapes).
    question = QUESTION + " Keep it short."
    body = {"model": MODEL, "input": question, "max_output_tokens": 24, "temperature": 1.5}
    a = openai_client.responses.create(**body, extra_body={"seed": 7}).output_text
    b = openai_client.responses.create(**body, extra_body={"seed": 7}).output_text
    c = openai_client.responses.create(**body, top_p=0.01).output_text
    greedy = openai_client.responses.create(**{**body, "temperature": 0}).output_text
    assert a == b  # seeded sampling repeats
    assert c == greedy  # top_p that keeps one token is greedy


def test_previous_response_id_continues(openai_client):
    first = openai_client.responses.create(
        model=MODEL, input="My name is Ada.", max_output_tokens=16, temperature=0
    )
    second = openai_client.responses.create(
        model=MODEL,
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=16,
        temperature=0,
    )
    alone = openai_client.responses.create(
        model=MODEL, input="What is my name?", max_output_tokens=16, temperature=0
    )
    # The earlier turn (question and answer) is in the prompt.
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id
    assert openai_client.responses.retrieve(first.id).output_text == first.output_text
    openai_client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.responses.create(model=MODEL, input="again", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"


def test_store_false_is_not_kept(openai_client):
    out = openai_client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    assert out.store is False
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(out.id)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"conversation": "conv_123"}, "conversation"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        ({"previous_response_id": "resp_unknown"}, "previous_response_id"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_refused_fields_name_the_field(openai_client, extra, param):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.responses.create(**body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["message"]


def test_context_overflow_names_input(client):
    r = client.post("/v1/responses", json={"model": SMALL_CTX_MODEL, "input": "word " * 600})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "input"


def test_unknown_model_is_404_before_streaming(client):
    r = client.post("/v1/responses", json={"model": "nope", "input": "Hi", "stream": True})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


# -- tools and structured output ----------------------------------------------------------------

# -- pure logic, no model ---------------------------------------------------------------------


def test_error_after_stream_began_is_an_event_then_failed():
    import asyncio

    from server.api.openai.responses_protocol import Response, TextConfig
    from server.api.openai.responses_stream import Sequencer, frames, lifecycle
    from server.errors import Overloaded

    def response(status: str, error=None) -> Response:
        return Response(
            id="resp_x", created_at=0, status=status, error=error, model="m",
            parallel_tool_calls=True, store=False, temperature=1.0, text=TextConfig(),
            tool_choice="auto", tools=[], top_p=1.0,
        )  # fmt: skip

    seq = Sequencer()

    async def events():
        yield lifecycle(seq, "response.created", response("in_progress"))
        raise Overloaded("the queue is full")

    async def run() -> list[dict]:
        return [f async for f in frames(events(), seq, lambda e: response("failed", e))]

    out = [f.decode().split("\n") for f in asyncio.run(run())]
    assert all(f[0].startswith("event: ") and f[1].startswith("data: ") for f in out), out
    assert [f[0][7:] for f in out] == ["response.created", "error", "response.failed"]
    datas = [json.loads(f[1][6:]) for f in out]
    assert [d["sequence_number"] for d in datas] == [0, 1, 2]
    assert datas[1] == {
        "type": "error",
        "sequence_number": 1,
        "code": "queue_full",
        "message": "the queue is full",
        "param": None,
    }
    assert datas[2]["response"]["status"] == "failed"
    assert datas[2]["response"]["error"]["code"] == "queue_full"


def test_input_items_become_chat_messages():
    from server.api.openai.responses_input import input_messages

    items = [
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"a":1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [
            {"type": "input_text", "text": "t"}, {"type": "input_text", "text": "wo"}]},
    ]  # fmt: skip
    assert input_messages(items) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"a":1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert input_messages("Hello") == [{"role": "user", "content": "Hello"}]
