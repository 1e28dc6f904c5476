"""Render chat messages with the model's own Jinja chat template (from the GGUF or models.toml).

Messages are dicts in Hugging Face's chat shape: ``role``, ``content``, and for tool use
``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments"}}]``, arguments as
JSON text) and ``tool_call_id`` on ``role: "tool"`` messages. A template that renders tools itself
(its source mentions ``tools``) receives them as ``apply_chat_template`` passes them. Any other
template gets the documented fallback: the tools described in the system message in Hermes format
(``server.core.tools.tools_system_prompt``), past calls written as ``<tool_call>`` blocks in the
assistant's text, and tool results as user turns wrapped in ``<tool_response>``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any, cast

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from server.core.tools import (
    FALLBACK_FORMAT,
    Function,
    call_text,
    template_handles_tools,
    tool_response_text,
    tools_system_prompt,
)
from server.engine.base import Engine, ModelInfo
from server.errors import InvalidRequest


def render_chat(
    info: ModelInfo, messages: list[dict[str, Any]], tools: Sequence[Function] = ()
) -> tuple[str, bool]:
    """The prompt text, and whether it already starts with the BOS token."""
    if not info.chat_template:
        raise InvalidRequest(
            "this model has no chat template; use /v1/completions, or set chat_template for it "
            "in models.toml",
            param="messages",
        )
    if template_handles_tools(info.chat_template):
        messages, tool_dicts = [_hf_message(m) for m in messages], [f.as_tool() for f in tools]
    else:
        messages, tool_dicts = _fallback_messages(messages, tools), []
    formatter = Jinja2ChatFormatter(info.chat_template, info.eos_token, info.bos_token)
    try:
        # Hugging Face message dicts, wider than llama-cpp-python's own TypedDicts.
        text = formatter(messages=cast(Any, messages), tools=cast(Any, tool_dicts or None)).prompt
    except (jinja2.TemplateError, ValueError, TypeError) as e:  # e.g. bad role order
        raise InvalidRequest(
            f"the model's chat template rejected the messages: {e}", param="messages"
        ) from e
    return text, bool(info.bos_token) and text.startswith(info.bos_token)


def _hf_message(m: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face templates read a call's arguments as a mapping (they ``tojson`` it)."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        args: Any = c["function"]["arguments"]
        with contextlib.suppress(TypeError, ValueError):
            args = json.loads(args)
        calls.append({**c, "function": {**c["function"], "arguments": args}})
    return {**m, "content": m.get("content") or "", "tool_calls": calls}


def _fallback_messages(
    messages: list[dict[str, Any]], tools: Sequence[Function]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [
                call_text(c["function"]["name"], c["function"]["arguments"], FALLBACK_FORMAT)
                for c in m["tool_calls"]
            ]
            out.append({"role": "assistant", "content": "\n".join([content, *blocks]).strip()})
        elif role == "tool":
            text = tool_response_text(content)
            if out and out[-1].get("_tool_results"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        block = tools_system_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}".strip()}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def chat_prompt(
    engine: Engine, messages: list[dict[str, Any]], tools: Sequence[Function] = ()
) -> list[int]:
    """Token ids of chat messages rendered with the model's template (BOS added once)."""
    text, has_bos = render_chat(engine.info, messages, tools)
    return engine.tokenize(text, add_bos=not has_bos)
