"""Tool calls on /v1/chat/completions, on the real model over HTTP with the official openai SDK."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server.core.chat import render_chat
from server.core.tools import Function
from server.engine.base import ModelInfo

MODEL = "smollm2-135m"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {"name": "add", "description": "Add two integers", "parameters": ADD_SCHEMA},
    },
]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "add": ADD_SCHEMA}
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_call(call) -> dict:
    assert call.type == "function" and call.id
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def _create(openai_client, **kw):
    base = {"model": MODEL, "messages": WEATHER_Q, "tools": TOOLS, "temperature": 0}
    return openai_client.chat.completions.create(**{**base, "max_tokens": 120, **kw})


def test_required_returns_a_call_whose_arguments_validate(openai_client):
    out = _create(openai_client, tool_choice="required")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call)


def test_streamed_call_deltas_reassemble_to_the_same_call(openai_client):
    whole = _create(openai_client, tool_choice="required", parallel_tool_calls=False)
    stream = _create(openai_client, tool_choice="required", parallel_tool_calls=False, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call carries id, type and name
                assert d.id and d.type == "function" and d.function.name
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in whole.choices[0].message.tool_calls
    ]
    assert list(calls.values()) == expected
    assert len(expected) == 1
    jsonschema.validate(json.loads(expected[0]["arguments"]), SCHEMAS[expected[0]["name"]])


def test_named_tool_choice_calls_that_function(openai_client):
    out = _create(
        openai_client,
        messages=[{"role": "user", "content": "What is 2 plus 3?"}],
        tool_choice={"type": "function", "function": {"name": "add"}},
    )
    calls = out.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add"]
    _check_call(calls[0])


def test_tool_choice_none_leaves_tools_out(openai_client):
    auto = _create(openai_client, max_tokens=1)
    none = _create(openai_client, max_tokens=1, tool_choice="none")
    assert none.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None


def test_a_tool_result_continues_the_conversation(openai_client):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    messages = [
        *WEATHER_Q,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": '{"temperature": 21, "sky": "sunny"}',
        },
    ]
    out = _create(openai_client, messages=messages, max_tokens=40)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content
    assert out.usage.prompt_tokens > _create(openai_client, max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools"),
        (
            {
                "tool_choice": "required",
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "minProperties": 1},
                        },
                    }
                ],
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tool_requests_are_a_400(client, extra, param):
    body = {"messages": WEATHER_Q, "tools": TOOLS, "max_tokens": 4, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_required_without_tools_is_a_400(openai_client):
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(
            model=MODEL, messages=WEATHER_Q, tool_choice="required", max_tokens=4
        )


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_without_tools_gets_the_fallback_rendering():
    info = ModelInfo(
        n_ctx=512, n_vocab=10, chat_template=CHATML, bos_token="", eos_token="", size_bytes=0
    )
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    messages = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    text, _ = render_chat(info, messages, [Function("add", "Add", ADD_SCHEMA)])
    assert text.startswith("<|im_start|>system\nYou can call functions.")
    assert '"name": "add"' in text
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n3\n</tool_response>" in text


def test_template_with_tools_receives_them():
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "({{ c.function.name }} {{ c.function.arguments.a }}){% endfor %}"
        "{{ m.role }}:{{ m.content }};{% endfor %}"
    )
    info = ModelInfo(
        n_ctx=512, n_vocab=10, chat_template=template, bos_token="", eos_token="", size_bytes=0
    )
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    text, _ = render_chat(info, messages, [Function("add")])
    assert text == "[add](add 1)assistant:;"
