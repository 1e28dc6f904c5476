"""/v1/responses (OpenAI's Responses API) on the real model, through the official openai SDK."""

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

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
ASK_WEATHER = "What is the weather in Paris?"


def _valid_weather_args(arguments: str) -> bool:
    args = json.loads(arguments)
    return (
        set(args) == {"city", "unit"}
        and isinstance(args["city"], str)
        and args["unit"] in ("celsius", "fahrenheit")
    )


def test_required_tool_returns_a_valid_function_call(openai_client):
    out = openai_client.responses.create(
        model=MODEL,
        input=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=64,
        temperature=0,
    )
    assert out.status == "completed"
    calls = [item for item in out.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.id.startswith("fc_") and call.status == "completed"
    assert _valid_weather_args(call.arguments)


def test_allowed_tools_required_calls_only_those(openai_client):
    clock = {
        "type": "function",
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    }
    out = openai_client.responses.create(
        model=MODEL,
        input=ASK_WEATHER,
        tools=[WEATHER, clock],
        tool_choice={
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "function", "name": "get_time"}],
        },
        max_output_tokens=64,
        temperature=0,
    )
    calls = [item for item in out.output if item.type == "function_call"]
    assert calls and all(c.name == "get_time" for c in calls)
    assert all(isinstance(json.loads(c.arguments)["timezone"], str) for c in calls)


def test_named_tool_choice_streams_arguments(openai_client):
    events = list(
        openai_client.responses.create(
            model=MODEL,
            input=ASK_WEATHER,
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=64,
            temperature=0,
            stream=True,
        )
    )
    types = [e.type for e in events]
    assert types[-1] == "response.completed"
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.arguments == ""
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert deltas == done.arguments
    assert _valid_weather_args(done.arguments)
    final = events[-1].response.output
    assert [i.type for i in final] == ["function_call"]
    assert final[0].arguments == done.arguments and final[0].call_id == added.item.call_id
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_function_call_output_continues_the_conversation(openai_client):
    def answer(result: str):
        return openai_client.responses.create(
            model=MODEL,
            tools=[WEATHER],
            input=[
                {"role": "user", "content": ASK_WEATHER},
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city": "Paris", "unit": "celsius"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": result},
            ],
            tool_choice="none",
            max_output_tokens=24,
            temperature=0,
        )

    short, long = answer("18 C, sunny"), answer("18 C, sunny, light wind from the west, dry")
    assert short.status in ("completed", "incomplete")
    assert short.output[0].type == "message" and short.output_text.strip()
    assert long.usage.input_tokens > short.usage.input_tokens  # the result is in the prompt


def test_tool_round_trip_with_previous_response_id(openai_client):
    first = openai_client.responses.create(
        model=MODEL, input=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        max_output_tokens=64, temperature=0,
    )  # fmt: skip
    call = next(i for i in first.output if i.type == "function_call")
    second = openai_client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}],
        max_output_tokens=16,
        temperature=0,
    )
    assert second.usage.input_tokens > first.usage.input_tokens


def test_text_format_json_schema(openai_client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    out = openai_client.responses.create(
        model=MODEL,
        input="Invent a person. Reply in JSON.",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema}},
        max_output_tokens=64,
        temperature=0,
    )
    assert out.status == "completed"
    data = json.loads(out.output_text)
    assert set(data) == {"name", "age"}
    assert isinstance(data["name"], str) and isinstance(data["age"], int)
    assert out.text.format.type == "json_schema"


def test_text_format_json_object_streamed(openai_client):
    events = list(
        openai_client.responses.create(
            model=MODEL,
            input="Describe a cat as JSON with keys name and color.",
            text={"format": {"type": "json_object"}},
            max_output_tokens=96,
            temperature=0,
            stream=True,
        )
    )
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "f"}},
         "tool_choice.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "required",
          "tools": [{"type": "function", "name": "nope"}]}}, "tool_choice.tools[0].name"),
        ({"tools": [{**WEATHER, "name": "bad name!"}]}, "tools[0].name"),
        (
            {"tools": [{**WEATHER, "parameters": {"type": "object", "patternProperties": {}}}],
             "tool_choice": "required"},
            "tools[0].parameters",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "x",
                                 "schema": {"type": "string", "not": {}}}}},
            "text.format.schema",
        ),
    ],
)  # fmt: skip
def test_bad_tools_and_formats_name_the_field(openai_client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, **extra)
    assert e.value.body["param"] == param


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
