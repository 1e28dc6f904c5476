"""Responses API ``tools``/``tool_choice``/``text.format`` → the core's tool plan and grammar, and
the model's text → output items. Only mapping here: the call formats, the call parser and the
schema-to-grammar conversion are server/core's (tools.py, grammar.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.api.openai.responses_input import parse_as
from server.api.openai.responses_protocol import (
    FunctionTool,
    ItemStatus,
    ResponseCreateRequest,
    StreamEvent,
    ToolChoiceAllowed,
    ToolChoiceFunction,
)
from server.api.openai.responses_stream import OutputBuilder
from server.core import grammar
from server.core.tools import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Function,
    ToolCallParser,
    ToolEvent,
    call_rule,
    detect_format,
)
from server.engine.base import Finished, ModelInfo
from server.errors import InvalidRequest, Unsupported

_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class OutputPlan:
    """What the prompt offers, how generation is constrained, and whether to look for calls."""

    functions: tuple[Function, ...] = ()  # rendered into the prompt; calls of these are parsed
    grammar: str | None = None
    parallel: bool = True


def _functions(tools: Sequence[FunctionTool]) -> tuple[Function, ...]:
    functions = tuple(
        Function(t.name, t.description, t.parameters or dict(_NO_PARAMETERS)) for t in tools
    )
    if len({f.name for f in functions}) != len(functions):
        raise InvalidRequest("two tools have the same name", param="tools")
    return functions


def _content_rule(body: ResponseCreateRequest, b: grammar.GrammarBuilder) -> str | None:
    """The rule the message text must match under ``text.format`` (None: free text)."""
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return b.schema({"type": "object"}, "json", param="text.format")
    if fmt.schema_ is None:
        raise InvalidRequest("text.format json_schema needs a `schema`", param="text.format.schema")
    return b.schema(fmt.schema_, "json", param="text.format.schema")


def _check_parameters(tools: Sequence[FunctionTool], functions: Sequence[Function]) -> None:
    """A tool whose schema cannot be enforced is a 400 naming it in the Responses shape."""
    index = {t.name: i for i, t in enumerate(tools)}
    for f in functions:
        grammar.check_schema(f.parameters, param=f"tools[{index[f.name]}].parameters")


def _tool_choice(
    choice: str | dict[str, Any], functions: tuple[Function, ...], parallel: bool
) -> tuple[tuple[Function, ...], tuple[Function, ...], bool]:
    """(functions offered, functions one of which must be called, parallel) for tool_choice."""
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                f"tool_choice {choice!r} is not one of none, auto, required (or an object)",
                param="tool_choice",
            )
        if choice == "none":  # left out of the prompt: the reply cannot call them
            return (), (), parallel
        return functions, functions if choice == "required" else (), parallel
    by_name = {f.name: f for f in functions}

    def named(name: str, param: str) -> Function:
        if name not in by_name:
            raise InvalidRequest(f"no tool named {name!r} in tools", param=param)
        return by_name[name]

    kind = choice.get("type")
    if kind == "function":
        fc = parse_as(ToolChoiceFunction, choice, "tool_choice")
        # OpenAI: the model calls that one function.
        return functions, (named(fc.name, "tool_choice.name"),), False
    if kind == "allowed_tools":
        allowed = parse_as(ToolChoiceAllowed, choice, "tool_choice")
        subset = tuple(
            named(t.name, f"tool_choice.tools[{i}].name") for i, t in enumerate(allowed.tools)
        )
        return subset, subset if allowed.mode == "required" else (), parallel
    raise Unsupported(
        f"tool_choice type {kind!r} is not supported; only function tools run here",
        param="tool_choice.type",
    )


def plan_output(
    info: ModelInfo, body: ResponseCreateRequest, tools: Sequence[FunctionTool]
) -> OutputPlan:
    choice = body.tool_choice
    if not tools and choice not in ("none", "auto"):
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    functions, forced, parallel = _tool_choice(
        choice, _functions(tools), body.parallel_tool_calls is not False
    )
    b = grammar.GrammarBuilder()
    if not functions:
        content = _content_rule(body, b)
        return OutputPlan(grammar=b.root(content) if content else None)
    fmt = detect_format(info.chat_template)
    if forced:
        _check_parameters(tools, forced)
        return OutputPlan(functions, b.root(call_rule(b, forced, fmt, parallel=parallel)), parallel)
    content = _content_rule(body, b)
    if content is None:  # free text, which may hold calls (their arguments are not enforced)
        return OutputPlan(functions, None, parallel)
    _check_parameters(tools, functions)
    calls = call_rule(b, functions, fmt, parallel=parallel)
    return OutputPlan(functions, b.root(f"{calls} | {content}"), parallel)


class Splitter:
    """Feeds generated text to the output builder: as message text, or (when tools are offered)
    through the core's incremental call parser, so calls stream as they are recognised."""

    def __init__(self, plan: OutputPlan, builder: OutputBuilder) -> None:
        self.builder = builder
        self._parser = ToolCallParser(plan.functions, parallel=plan.parallel)
        self._parse = bool(plan.functions)

    def feed(self, text: str) -> list[StreamEvent]:
        if not self._parse:
            return self.builder.content(text)
        return self._apply(self._parser.feed(text))

    def finish(self, finished: Finished | None) -> list[StreamEvent]:
        events = self._apply(self._parser.finish()) if self._parse else []
        status: ItemStatus = (
            "completed" if finished is not None and finished.reason == "stop" else "incomplete"
        )
        return events + self.builder.finish(status)

    def _apply(self, tool_events: list[ToolEvent]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for ev in tool_events:
            if isinstance(ev, ContentDelta):
                out += self.builder.content(ev.text)
            elif isinstance(ev, CallStart):
                out += self.builder.call(ev.id, ev.name)
            elif isinstance(ev, ArgumentsDelta):
                out += self.builder.arguments(ev.text)
        return out
