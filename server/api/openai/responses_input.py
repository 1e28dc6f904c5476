"""Responses API request → chat messages, and the fields codeserve refuses (400 naming them).

``input`` items map onto the chat-completions message shape the generation core renders:
messages become ``{"role", "content"}``, ``function_call`` items become an assistant message's
``tool_calls``, and ``function_call_output`` items become ``tool`` messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from server.api.openai.responses_protocol import FunctionTool, ResponseCreateRequest
from server.errors import InvalidRequest, Unsupported

Message = dict[str, Any]

# Include values that ask for nothing a non-reasoning model produces (codex sends the first).
_HARMLESS_INCLUDES = {"reasoning.encrypted_content"}
_NO_EFFORT = {None, "none"}


def refuse_unsupported(body: ResponseCreateRequest) -> None:
    """400 for every field that would change the answer and that codeserve cannot honour."""
    if body.n != 1:
        raise Unsupported("the Responses API produces one answer per request", param="n")
    if body.background:
        raise Unsupported("background responses are not supported", param="background")
    if body.conversation is not None:
        raise Unsupported(
            "conversations are not supported; chain responses with previous_response_id",
            param="conversation",
        )
    if body.prompt is not None:
        raise Unsupported("stored prompt templates are not supported", param="prompt")
    if body.context_management:
        raise Unsupported("context management is not supported", param="context_management")
    if body.truncation == "auto":
        raise Unsupported(
            "truncation 'auto' is not supported: an input longer than the context is a 400",
            param="truncation",
        )
    # As OpenAI answers for its own non-reasoning models: the models served here do not reason.
    if body.reasoning is not None:
        if body.reasoning.effort not in _NO_EFFORT:
            raise Unsupported(
                "reasoning.effort is not supported: this model does not reason",
                param="reasoning.effort",
            )
        if body.reasoning.summary or body.reasoning.generate_summary:
            raise Unsupported(
                "reasoning.summary is not supported: this model does not reason",
                param="reasoning.summary",
            )
    for value in body.include or []:
        if value not in _HARMLESS_INCLUDES:
            raise Unsupported(f"include value {value!r} is not supported", param="include")
    if body.top_logprobs:
        raise Unsupported("logprobs are not supported on /v1/responses", param="top_logprobs")
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise Unsupported(
            "text.verbosity is not supported: only the model's own 'medium'",
            param="text.verbosity",
        )


def function_tools(raw: list[dict[str, Any]]) -> list[FunctionTool]:
    """Function tools; built-in tools (web_search, file_search, ...) are a 400 naming them."""
    tools = []
    for i, spec in enumerate(raw):
        kind = spec.get("type")
        if kind != "function":
            raise Unsupported(
                f"tool type {kind!r} is not supported; only function tools run here",
                param=f"tools[{i}].type",
            )
        tools.append(parse_as(FunctionTool, spec, f"tools[{i}]"))
    return tools


# -- input items ----------------------------------------------------------------------------------


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Part(_Item):
    type: str
    text: str | None = None


class _MessageItem(_Item):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[_Part]


class _FunctionCallItem(_Item):
    call_id: str
    name: str
    arguments: str


class _FunctionCallOutputItem(_Item):
    call_id: str
    output: str | list[_Part]


_TEXT_PARTS = {"input_text", "output_text", "text"}


def parse_as(model: type[Any], raw: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"])
        raise InvalidRequest(f"{where}{loc}: {err['msg']}", param=f"{where}{loc}") from e


def _text(content: str | list[_Part], where: str) -> str:
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part.type not in _TEXT_PARTS:
            raise Unsupported(
                f"content type {part.type!r} is not supported; this model reads text only",
                param=f"{where}[{j}].type",
            )
    return "".join(p.text or "" for p in content)


def input_messages(items: str | list[dict[str, Any]]) -> list[Message]:
    """The chat messages for ``input``; consecutive function calls join one assistant turn."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[Message] = []
    for i, raw in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(raw, dict):
            raise InvalidRequest(f"{where}: an input item is an object", param=where)
        kind = raw.get("type", "message")
        if kind == "message":
            m = parse_as(_MessageItem, raw, where)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _text(m.content, f"{where}.content")})
        elif kind == "function_call":
            fc = parse_as(_FunctionCallItem, raw, where)
            call = {
                "id": fc.call_id,
                "type": "function",
                "function": {"name": fc.name, "arguments": fc.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = parse_as(_FunctionCallOutputItem, raw, where)
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": out.call_id,
                    "content": _text(out.output, f"{where}.output"),
                }
            )
        else:
            raise Unsupported(
                f"input item type {kind!r} is not supported (message, function_call and "
                "function_call_output are)",
                param=f"{where}.type",
            )
    if not messages:
        raise InvalidRequest("input has no items", param="input")
    return messages
