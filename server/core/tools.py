"""Tool (function) calling, shared by every dialect: the call format a model is prompted with, a
grammar that forces a call, and a parser that finds calls in a model's text, streamed or not.

Formats found in output (whatever the template): Hermes/Qwen ``<tool_call>{json}</tool_call>``,
Mistral ``[TOOL_CALLS][{json}, ...]``, Llama 3 ``{"name": ..., "parameters": {...}}`` (optionally
after ``<|python_tag|>``) and plain JSON ``{"name": ..., "arguments": {...}}`` or a list of them,
when the whole reply is that JSON. Only calls naming a declared function count; anything else is
content.

The parser is incremental and is used for whole texts too, so a streamed answer reassembles to the
non-streamed one exactly. Arguments are streamed as the raw JSON text of the model's
``arguments`` value: its fragments concatenate to the final ``arguments`` string. (A partial-JSON
library such as partial-json-parser re-serialises a partial object on every token, and the
prefixes of those serialisations are not stable, so it cannot give fragments with that property.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from server.core.grammar import GrammarBuilder
from server.core.json_scan import Malformed, ObjectScan, scan_object, skip_ws

ToolFormat = Literal["hermes", "mistral", "llama3"]
# The format we describe to a model whose chat template ignores `tools` (SmolLM2's, say).
FALLBACK_FORMAT: ToolFormat = "hermes"
_MARKERS = {"<tool_call>": "hermes", "[TOOL_CALLS]": "mistral", "<|python_tag|>": "llama3"}
_HERMES_END = "</tool_call>"
_EMPTY_PARAMS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: dict(_EMPTY_PARAMS))

    def as_tool(self) -> dict[str, Any]:
        """OpenAI's / Hugging Face's tool shape, what chat templates receive as ``tools``."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- prompting ---------------------------------------------------------------------------------


def template_handles_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template renders ``tools`` itself (as Hugging Face's do)."""
    return bool(chat_template) and "tools" in (chat_template or "")


def detect_format(chat_template: str | None) -> ToolFormat:
    """The call format a chat template teaches its model (the fallback if it teaches none)."""
    t = chat_template or ""
    if not template_handles_tools(t):
        return FALLBACK_FORMAT
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "parameters" in t:
        return "llama3"
    return FALLBACK_FORMAT


def call_text(name: str, arguments: str, fmt: ToolFormat = FALLBACK_FORMAT) -> str:
    """How a call looks in a model's output, to render past assistant turns in a template that
    does not handle ``tool_calls`` itself."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = arguments
    key = "parameters" if fmt == "llama3" else "arguments"
    body = json.dumps({"name": name, key: args}, ensure_ascii=False)
    if fmt == "hermes":
        return f"<tool_call>\n{body}\n</tool_call>"
    if fmt == "mistral":
        return f"[TOOL_CALLS][{body}]"
    return body


def tools_system_prompt(functions: Sequence[Function]) -> str:
    """The fallback tool description for templates that ignore ``tools`` (Hermes format)."""
    lines = [
        "You can call functions. To call one, reply with only:",
        "<tool_call>",
        '{"name": "<function name>", "arguments": <the arguments as a JSON object>}',
        "</tool_call>",
        "The functions, as JSON schemas:",
        *(json.dumps(f.as_tool(), ensure_ascii=False) for f in functions),
    ]
    return "\n".join(lines)


def tool_response_text(content: str) -> str:
    """A tool's result as a user turn, for templates that do not render ``role: tool``."""
    return f"<tool_response>\n{content}\n</tool_response>"


# -- forcing a call ----------------------------------------------------------------------------


def call_rule(
    b: GrammarBuilder, functions: Sequence[Function], fmt: ToolFormat, *, parallel: bool
) -> str:
    """Adds rules for one call (or, with ``parallel``, one or more) of ``functions`` in ``fmt``,
    whose arguments follow each function's JSON schema; returns the rule's name."""
    key = "parameters" if fmt == "llama3" else "arguments"
    alts = []
    for i, f in enumerate(functions):
        schema = {
            "type": "object",
            "properties": {"name": {"const": f.name}, key: f.parameters},
            "required": ["name", key],
            "additionalProperties": False,
        }
        alts.append(b.schema(schema, f"call{i}", param=f"tools[{i}].function.parameters"))
    call = b.rule("call", " | ".join(alts))
    if fmt == "hermes":
        block = b.rule(
            "call-block",
            f'{b.literal("<tool_call>")} "\\n"? {call} "\\n"? {b.literal(_HERMES_END)}',
        )
        return b.rule("calls", f"{block}+" if parallel else block)
    if fmt == "mistral":
        more = f' ("," space {call})*' if parallel else ""
        return b.rule("calls", f'{b.literal("[TOOL_CALLS]")} "[" space {call}{more} "]"')
    return b.rule("calls", f'{call} (";" space {call})*' if parallel else call)


def call_grammar(functions: Sequence[Function], fmt: ToolFormat, *, parallel: bool) -> str:
    """GBNF that admits only calls of ``functions`` (OpenAI's ``tool_choice`` "required" or a
    named function) with schema-valid arguments; the sequence can end once the calls are done."""
    b = GrammarBuilder()
    return b.root(call_rule(b, functions, fmt, parallel=parallel))


# -- finding calls in output -------------------------------------------------------------------


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


ToolEvent = ContentDelta | CallStart | ArgumentsDelta


class ToolCallParser:
    """Splits a model's output into content and tool calls, incrementally.

    ``feed`` each piece of text as it is generated and ``finish`` at the end; both return the
    events that became certain (content text, a call's start with its id and name, fragments of
    its arguments). ``content`` and ``calls`` hold the result so far. Whitespace between content
    and a call is dropped. With ``parallel=False`` calls after the first are dropped.
    """

    def __init__(self, functions: Sequence[Function], *, parallel: bool = True):
        self._names = {f.name for f in functions}
        self._parallel = parallel
        self._buf = ""  # text not yet decided on
        self._ws = ""  # trailing whitespace of content, sent only if more content follows
        self._mode: Literal["text", "call"] = "text"
        self._kind = ""  # the marker that opened the current call region ("" for bare JSON)
        self._in_array = False
        self._raw = ""  # the region's text so far, given back as content if it holds no call
        self._region_calls = 0
        self._calls_seen = 0  # including dropped ones
        self._after_call = False
        self._current: _Current | None = None
        self.content = ""
        self.calls: list[ToolCall] = []
        self.incomplete = False  # the output ended inside a call

    def feed(self, text: str) -> list[ToolEvent]:
        self._buf += text
        events: list[ToolEvent] = []
        self._run(events, final=False)
        return events

    def finish(self) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        self._run(events, final=True)
        if self._mode == "call":
            if self._current is not None:
                self.incomplete = True
                self._close_call(events, complete=False)
                self._buf = ""  # the unfinished call's text
            elif self._region_calls == 0:
                self._give_back(events)
        rest = self._buf if self._mode == "text" or self._region_calls else ""
        if not (self.calls and not rest.strip()):
            self._content(events, self._ws + rest, final=True)
        self._buf = self._ws = ""
        return events

    # -- machinery ---------------------------------------------------------------------------

    def _content(self, events: list[ToolEvent], text: str, *, final: bool = False) -> None:
        if self._after_call:  # whitespace between a call and content is dropped too
            text = text.lstrip()
            self._after_call = not text
        body = text if final else text.rstrip()
        if not final:
            self._ws = text[len(body) :]
        if body:
            self.content += body
            events.append(ContentDelta(body))

    def _run(self, events: list[ToolEvent], *, final: bool) -> None:
        while True:
            before = (self._mode, self._buf, self._current is None)
            if self._mode == "text":
                self._text_step(events, final)
            else:
                self._call_step(events, final)
            if (self._mode, self._buf, self._current is None) == before:
                return

    def _text_step(self, events: list[ToolEvent], final: bool) -> None:
        buf = self._buf
        hits = [(buf.find(m), m) for m in _MARKERS if m in buf]
        if hits:
            i, marker = min(hits)
            self._content(events, self._ws + buf[:i])
            self._open(marker, buf[i:], len(marker))
            return
        # Bare JSON is a call only as the whole reply, or after another call (Llama 3 style).
        json_may_start = not self.content or self._calls_seen > 0
        stripped = buf.lstrip(" \t\r\n;")
        if not final and any(m.startswith(stripped) for m in _MARKERS):
            return  # perhaps the start of a marker ("[" of "[TOOL_CALLS]")
        if json_may_start and stripped[:1] in ("{", "["):
            self._open("", stripped, 0)
            return
        if final or (json_may_start and not stripped):
            return  # at the end finish() flushes; whitespace alone may still precede a call
        hold = max(
            (k for m in _MARKERS for k in range(1, len(m)) if buf.endswith(m[:k])), default=0
        )
        head, self._buf = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self._content(events, self._ws + head)

    def _open(self, marker: str, text: str, skip: int) -> None:
        self._mode, self._kind, self._in_array, self._region_calls = "call", marker, False, 0
        self._raw, self._buf = text[:skip], text[skip:]
        self._ws = ""

    def _give_back(self, events: list[ToolEvent]) -> None:
        """The region holds no call after all: its text is content (bare JSON: up to the next
        marker, so that the same text is not taken for a call again)."""
        self._mode = "text"
        raw, self._raw = self._raw, ""
        if not self._kind:
            hits = [self._buf.find(m) for m in _MARKERS if m in self._buf]
            cut = min(hits, default=len(self._buf))
            raw, self._buf = raw + self._buf[:cut], self._buf[cut:]
        self._content(events, self._ws + raw)

    def _consume(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _call_step(self, events: list[ToolEvent], final: bool) -> None:
        j = skip_ws(self._buf, 0)
        if j >= len(self._buf):
            return
        c = self._buf[j]
        if self._current is None:
            if c == "[" and not self._in_array and self._region_calls == 0:
                self._in_array = True
                return self._consume(j + 1)
            if c == "," and self._in_array and self._region_calls:
                return self._consume(j + 1)
            if c == "]" and self._in_array:
                self._consume(j + 1)
                return self._end_region(final)
            if c != "{":
                return self._end_region(final) if self._region_calls else self._give_back(events)
        try:
            scan = scan_object(self._buf, j)
        except (Malformed, ValueError):
            if self._current is None:
                return self._give_back(events)
            self._close_call(events, complete=False)
            return self._end_region(final)
        if self._current is None:
            if scan.name is None and scan.end is None:
                return  # the name is still to come
            if scan.name is None or scan.name not in self._names:
                return self._give_back(events)
            discard = bool(self.calls) and not self._parallel
            self._current = _Current(len(self.calls), new_call_id(), scan.name, discard)
            self._region_calls += 1
            self._calls_seen += 1
            if not discard:
                events.append(CallStart(self._current.index, self._current.id, scan.name))
        self._stream_args(events, scan)
        if scan.end is not None:
            self._close_call(events, complete=True)
            self._consume(scan.end)
            if not self._in_array:
                self._end_region(final)

    def _stream_args(self, events: list[ToolEvent], scan: ObjectScan) -> None:
        cur = self._current
        if cur is None or scan.args is None:
            return
        start, end = scan.args
        if scan.args_is_string:  # arguments given as a JSON string: its decoded text, once
            if end is not None and not cur.args:
                self._emit_args(events, cur, json.loads(self._buf[start:end]) or "{}")
            return
        if end is None and self._buf[start] not in "{[":
            return  # a scalar that may still grow
        self._emit_args(events, cur, self._buf[start + cur.sent : end or len(self._buf)])
        cur.sent = (end or len(self._buf)) - start

    @staticmethod
    def _emit_args(events: list[ToolEvent], cur: _Current, text: str) -> None:
        if text:
            cur.args += text
            if not cur.discard:
                events.append(ArgumentsDelta(cur.index, text))

    def _close_call(self, events: list[ToolEvent], *, complete: bool) -> None:
        cur, self._current = self._current, None
        if cur is None:
            return
        if complete and not cur.args:
            self._emit_args(events, cur, "{}")
        if not cur.discard:
            self.calls.append(ToolCall(cur.id, cur.name, cur.args))

    def _end_region(self, final: bool) -> None:
        if self._kind == "<tool_call>":
            j = skip_ws(self._buf, 0)
            tail = self._buf[j:]
            if tail.startswith(_HERMES_END):
                self._buf = tail[len(_HERMES_END) :]
            elif _HERMES_END.startswith(tail) and not final:
                return  # the closing tag is still arriving
        self._mode, self._raw, self._after_call = "text", "", True


@dataclass
class _Current:
    """The call being parsed."""

    index: int
    id: str
    name: str
    discard: bool  # a call past the first with parallel_tool_calls=false
    args: str = ""
    sent: int = 0  # characters of the raw arguments value already emitted


def parse_tool_calls(
    text: str, functions: Sequence[Function], *, parallel: bool = True
) -> tuple[str | None, list[ToolCall]]:
    """Content (None if only calls) and the tool calls in a whole output."""
    p = ToolCallParser(functions, parallel=parallel)
    p.feed(text)
    p.finish()
    content = p.content if (p.content.strip() or not p.calls) else None
    return content, p.calls
