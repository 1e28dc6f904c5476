"""/v1/responses tool calls and structured output on the real model, through the openai SDK.

Function tools (required, allowed and named choices, streamed arguments, call outputs that
continue the conversation) and ``text.format`` JSON; the request/answer shapes and streaming
events are tests/test_responses.py.
"""

from __future__ import annotations

import json

import openai
import pytest

MODEL = "smollm2-135m"


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
