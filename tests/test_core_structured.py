"""Grammar conversion, grammar validation and tool-call parsing: pure logic, no model."""

from __future__ import annotations

import json

import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from server.core import grammar
from server.core.tools import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Function,
    ToolCallParser,
    call_grammar,
    call_text,
    detect_format,
    parse_tool_calls,
)
from server.errors import InvalidRequest, Unsupported


class Address(BaseModel):
    city: str
    zip: str | None = None


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]
    address: Address


def test_pydantic_schema_converts_to_valid_gbnf():
    gbnf = grammar.schema_to_gbnf(to_strict_json_schema(Person))
    assert grammar.check_gbnf(gbnf) == gbnf
    assert '"\\"address\\""' in gbnf  # the $ref was inlined into the object rule


def test_json_object_grammar_is_valid():
    gbnf = grammar.json_object_gbnf()
    assert grammar.check_gbnf(gbnf) == gbnf
    assert gbnf.splitlines()[-1] or "root ::=" in gbnf


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "integer", "minimum": 0}, "minimum"),
        ({"type": "object", "properties": {"e": {"type": "string", "format": "email"}}}, "format"),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
        ({"allOf": [{"type": "string"}]}, "allOf"),
        ({"type": "string", "pattern": "abc"}, "pattern"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "required": ["a"]}, "required"),
        ({"type": "object", "properties": {}, "required": ["a"]}, "required"),
        ({"type": "object", "properties": {"a": {"$ref": "#"}}}, "$ref"),
        ({"$ref": "https://example.com/s.json"}, "$ref"),
        ({"type": "object", "patternProperties": {"^x$": {}}}, "patternProperties"),
        ({"type": ["string", "null"], "maxLength": 4}, "maxLength"),
    ],
)
def test_unenforceable_keyword_is_refused_by_name(schema, keyword):
    with pytest.raises(Unsupported) as e:
        grammar.schema_to_gbnf(schema, param="response_format")
    assert f"`{keyword}`" in e.value.message
    assert e.value.param == "response_format" and e.value.status_code == 400


def test_annotations_do_not_count_as_constraints():
    schema = {"title": "T", "description": "d", "type": "string", "examples": ["x"]}
    assert "root ::=" in grammar.schema_to_gbnf(schema)


@pytest.mark.parametrize(
    "bad",
    ["root ::= undefined-rule", 'root ::= ("a"', 'item ::= "a"', 'root ::= root "a"', "  "],
)
def test_bad_gbnf_is_a_400(bad):
    with pytest.raises(InvalidRequest) as e:
        grammar.check_gbnf(bad, param="grammar")
    assert e.value.param == "grammar"


def test_literal_escaping_round_trips_through_the_parser():
    b = grammar.GrammarBuilder()
    gbnf = b.root(b.literal('a"b\\c\n\t\x01'))
    assert grammar.check_gbnf(gbnf)


WEATHER = Function(
    "get_weather",
    "Weather for a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
)
ADD = Function("add")
FUNCS = [WEATHER, ADD]


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "llama3"])
@pytest.mark.parametrize("parallel", [True, False])
def test_call_grammars_parse(fmt, parallel):
    assert grammar.check_gbnf(call_grammar(FUNCS, fmt, parallel=parallel))


def test_format_detection():
    assert detect_format(None) == "hermes"
    assert detect_format("{{ messages }}") == "hermes"  # ignores tools: the fallback
    assert detect_format("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert detect_format("{% if tools %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert detect_format("{% if tools %}{{ parameters }}{% endif %}") == "llama3"


CASES = [
    (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Sure.",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "P\\"}"}}</tool_call>\n'
        '<tool_call>{"name":"add","arguments":{}}</tool_call> done',
        "done",
        [("get_weather", '{"city": "P\\"}"}'), ("add", "{}")],
    ),
    (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, '
        '{"name": "add", "arguments": "{\\"a\\": 1}"}]',
        None,
        [("get_weather", '{"city": "Rome"}'), ("add", '{"a": 1}')],
    ),
    (
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        None,
        [("get_weather", '{"city": "Oslo"}')],
    ),
    ('<|python_tag|>{"name": "add", "parameters": {}}', None, [("add", "{}")]),
    ('[{"name": "add", "arguments": {"x": [1, 2]}}]', None, [("add", '{"x": [1, 2]}')]),
    (
        '<tool_call>{"arguments": {"city": "X"}, "name": "get_weather"}</tool_call>',
        None,
        [("get_weather", '{"city": "X"}')],
    ),
    (
        '{"name": "add"}; {"name": "get_weather", "arguments": {"city": "B"}}',
        None,
        [("add", "{}"), ("get_weather", '{"city": "B"}')],
    ),
    # Not calls: JSON without a declared name, prose, an unknown function.
    ('{"city": "Oslo"}', '{"city": "Oslo"}', []),
    ('{"name": "nope", "arguments": {}}', '{"name": "nope", "arguments": {}}', []),
    ('Hello {"name": "add"}', 'Hello {"name": "add"}', []),
    ("  text with < and [ inside  ", "  text with < and [ inside  ", []),
    (
        '<tool_call>{"name": "nope"}</tool_call> then <tool_call>{"name": "add"}</tool_call>',
        '<tool_call>{"name": "nope"}</tool_call> then',
        [("add", "{}")],
    ),
]


def _streamed(text: str, step: int, parallel: bool = True):
    parser = ToolCallParser(FUNCS, parallel=parallel)
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i : i + step])
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, CallStart):
            assert e.index not in calls and e.id.startswith("call_")
            calls[e.index] = [e.name, ""]
        elif isinstance(e, ArgumentsDelta):
            assert e.index in calls  # the name always comes first
            calls[e.index][1] += e.text
    return content, [tuple(c) for c in calls.values()]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_parse_whole_output(text, content, calls):
    got_content, got_calls = parse_tool_calls(text, FUNCS)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    for c in got_calls:
        json.loads(c.arguments)


@pytest.mark.parametrize("step", [1, 2, 5, 10_000])
@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_streamed_events_reassemble_to_the_whole_parse(text, content, calls, step):
    got_content, got_calls = _streamed(text, step)
    assert got_content == (content or "")
    assert got_calls == calls


def test_parallel_false_keeps_the_first_call():
    text = CASES[1][0]
    content, calls = parse_tool_calls(text, FUNCS, parallel=False)
    assert [c.name for c in calls] == ["get_weather"] and content == "done"
    assert _streamed(text, 1, parallel=False)[1] == [("get_weather", '{"city": "P\\"}"}')]


def test_output_cut_inside_a_call_is_incomplete():
    parser = ToolCallParser(FUNCS)
    parser.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Pa')
    parser.finish()
    assert parser.incomplete and parser.calls[0].arguments == '{"city": "Pa'
    assert parser.content == ""


def test_call_text_round_trips():
    for fmt in ("hermes", "mistral", "llama3"):
        text = call_text("get_weather", '{"city": "Rome"}', fmt)
        _, calls = parse_tool_calls(text, FUNCS)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Rome"})
        ]


# -- the OpenAI dialect's mapping of constraint fields (no model) ----------------------------


def _chat(**kw):
    from server.api.openai.chat_protocol import ChatCompletionRequest

    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER.parameters}},
        {"type": "function", "function": {"name": "add"}},
    ]
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools, **kw)


def test_tool_plans():
    from server.api.openai.constraints import tool_plan

    auto = tool_plan(_chat())
    assert auto is not None and not auto.forced and auto.parallel
    assert tool_plan(_chat(tool_choice="none")) is None
    assert [f.name for f in tool_plan(_chat(tool_choice="required")).forced] == [
        "get_weather",
        "add",
    ]
    named = tool_plan(_chat(tool_choice={"type": "function", "function": {"name": "add"}}))
    assert [f.name for f in named.forced] == ["add"] and not named.parallel
    allowed = tool_plan(
        _chat(
            tool_choice={
                "type": "allowed_tools",
                "allowed_tools": {
                    "mode": "required",
                    "tools": [{"type": "function", "function": {"name": "add"}}],
                },
            }
        )
    )
    assert [f.name for f in allowed.functions] == ["add"] == [f.name for f in allowed.forced]
    with pytest.raises(InvalidRequest):
        tool_plan(_chat(tool_choice={"type": "function", "function": {"name": "nope"}}))


def test_chat_grammars():
    from server.api.openai.constraints import chat_grammar, tool_plan

    plain = _chat()
    assert chat_grammar(plain, tool_plan(plain), "hermes") is None  # auto, free text
    forced = _chat(tool_choice="required")
    assert "<tool_call>" in chat_grammar(forced, tool_plan(forced), "hermes")
    both = _chat(response_format={"type": "json_object"})
    gbnf = chat_grammar(both, tool_plan(both), "hermes")
    assert grammar.check_gbnf(gbnf) and "<tool_call>" in gbnf and "root ::= calls | json" in gbnf
    with pytest.raises(InvalidRequest) as e:
        chat_grammar(_chat(grammar='root ::= "a"'), tool_plan(_chat()), "hermes")
    assert e.value.param == "grammar"
