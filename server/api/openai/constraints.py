"""OpenAI's (and llama-server's) output-constraint fields → the core's grammar, logit bias and
tool plan. Only mapping and validation here; the conversions live in server/core."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.api.openai.chat_protocol import ChatCompletionRequest
from server.api.openai.protocol import _ConstraintFields
from server.core import grammar
from server.core.tools import Function, ToolFormat, call_rule
from server.errors import InvalidRequest


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools."""

    functions: tuple[Function, ...]  # offered to the model (rendered into the prompt)
    forced: tuple[Function, ...]  # non-empty: the reply must be a call of one of these
    parallel: bool


def _content_source(body: _ConstraintFields) -> str | None:
    given = [
        name
        for name, set_ in (
            (
                "response_format",
                body.response_format is not None and body.response_format.type != "text",
            ),
            ("grammar", body.grammar is not None),
            ("json_schema", body.json_schema is not None),
        )
        if set_
    ]
    if len(given) > 1:
        raise InvalidRequest(
            f"`{given[0]}` and `{given[1]}` both constrain the output; send one", param=given[1]
        )
    return given[0] if given else None


def content_grammar(body: _ConstraintFields, vocab: object = None) -> str | None:
    """The GBNF the reply's text must match, from ``response_format``, ``grammar`` or
    ``json_schema`` (400 if it cannot be enforced); None when the text is free."""
    b = grammar.GrammarBuilder()
    rule = _content_rule(body, b)
    if rule is None:
        return (
            grammar.check_gbnf(body.grammar, param="grammar", vocab=vocab) if body.grammar else None
        )
    return b.root(rule)


def _content_rule(body: _ConstraintFields, b: grammar.GrammarBuilder) -> str | None:
    source = _content_source(body)
    if source == "response_format":
        rf = body.response_format
        assert rf is not None
        if rf.type == "json_object":
            return b.schema({"type": "object"}, "json", param="response_format")
        assert rf.type == "json_schema"
        return b.schema(rf.json_schema.schema_, "json", param="response_format.json_schema.schema")
    if source == "json_schema":
        return b.schema(body.json_schema, "json", param="json_schema")
    return None


def check_ignore_eos(body: _ConstraintFields, grammar_: str | None) -> bool:
    """``ignore_eos`` for the request. With a grammar it is refused: once the grammar is complete
    only end-of-generation tokens are allowed, so banning them leaves no token to sample."""
    if body.ignore_eos and grammar_ is not None:
        raise InvalidRequest(
            "`ignore_eos` cannot be combined with a grammar, JSON schema or forced tool call",
            param="ignore_eos",
        )
    return body.ignore_eos


def logit_bias(body: _ConstraintFields, n_vocab: int) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs; OpenAI's -100 becomes a ban (-inf), as its docs describe it."""
    out = []
    for key, bias in (body.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < n_vocab:
            raise InvalidRequest(
                f"logit_bias: token id {token} is not in this model's vocabulary [0, {n_vocab})",
                param="logit_bias",
            )
        out.append((token, -math.inf if bias <= -100 else float(bias)))
    return tuple(out)


def tool_plan(body: ChatCompletionRequest) -> ToolPlan | None:
    """None when the request offers no tools or ``tool_choice`` is "none" (then the tools are
    left out of the prompt: the reply cannot call them)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("`tool_choice` needs `tools`", param="tool_choice")
        return None
    functions = tuple(
        Function(
            t.function.name,
            t.function.description,
            t.function.parameters or {"type": "object", "properties": {}},
        )
        for t in body.tools
    )
    by_name = {f.name: f for f in functions}
    if len(by_name) != len(functions):
        raise InvalidRequest("two tools have the same name", param="tools")
    if choice == "none":
        return None
    forced: tuple[Function, ...] = ()
    parallel = body.parallel_tool_calls
    if choice == "required":
        forced = functions
    elif choice is not None and choice != "auto" and choice.type == "function":
        forced = (_named(by_name, choice.function.name, "tool_choice.function.name"),)
        parallel = False  # OpenAI: the model calls that function
    elif choice is not None and choice != "auto" and choice.type == "allowed_tools":
        allowed = tuple(
            _named(by_name, t.function.name, "tool_choice.allowed_tools.tools")
            for t in choice.allowed_tools.tools
        )
        functions = allowed
        forced = allowed if choice.allowed_tools.mode == "required" else ()
    return ToolPlan(functions, forced, parallel)


def _named(by_name: dict[str, Function], name: str, param: str) -> Function:
    if name not in by_name:
        raise InvalidRequest(f"no tool named {name!r} in `tools`", param=param)
    return by_name[name]


def chat_grammar(
    body: ChatCompletionRequest, plan: ToolPlan | None, fmt: ToolFormat, vocab: object = None
) -> str | None:
    """The grammar for a chat reply: forced calls, or (with tools on "auto") either calls or the
    constrained content, or the content constraint alone."""
    if plan is None:
        return content_grammar(body, vocab)
    b = grammar.GrammarBuilder()
    if plan.forced:
        index = {t.function.name: i for i, t in enumerate(body.tools or [])}
        for f in plan.forced:
            grammar.check_schema(f.parameters, param=f"tools[{index[f.name]}].function.parameters")
        return b.root(call_rule(b, plan.forced, fmt, parallel=plan.parallel))
    if body.grammar is not None:
        raise InvalidRequest("`grammar` together with `tools` is not supported", param="grammar")
    content = _content_rule(body, b)
    if content is not None:
        index = {t.function.name: i for i, t in enumerate(body.tools or [])}
        for f in plan.functions:
            grammar.check_schema(f.parameters, param=f"tools[{index[f.name]}].function.parameters")
    if content is None:
        return None  # free text, which may hold calls
    calls = call_rule(b, plan.functions, fmt, parallel=plan.parallel)
    return b.root(f"{calls} | {content}")
