"""Render chat messages with the model's own Jinja chat template (from the GGUF or models.toml)."""

from __future__ import annotations

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from server.engine.base import Engine, ModelInfo
from server.errors import InvalidRequest


def render_chat(info: ModelInfo, messages: list[dict]) -> tuple[str, bool]:
    """The prompt text, and whether it already starts with the BOS token."""
    if not info.chat_template:
        raise InvalidRequest(
            "this model has no chat template; use /v1/completions, or set chat_template for it "
            "in models.toml",
            param="messages",
        )
    formatter = Jinja2ChatFormatter(info.chat_template, info.eos_token, info.bos_token)
    try:
        text = formatter(messages=messages).prompt
    except (jinja2.TemplateError, ValueError) as e:  # templates raise for e.g. bad role order
        raise InvalidRequest(
            f"the model's chat template rejected the messages: {e}", param="messages"
        ) from e
    return text, bool(info.bos_token) and text.startswith(info.bos_token)


def chat_prompt(engine: Engine, messages: list[dict]) -> list[int]:
    """Token ids of chat messages rendered with the model's template (BOS added once)."""
    text, has_bos = render_chat(engine.info, messages)
    return engine.tokenize(text, add_bos=not has_bos)
