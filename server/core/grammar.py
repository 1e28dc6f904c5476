"""Output constraints as GBNF for llama.cpp's grammar sampler, shared by every dialect.

JSON schemas are converted by llama-cpp-python's ``llama_cpp.llama_grammar`` (a port of
llama.cpp's own json-schema-to-grammar, the converter llama-server uses): it is already a
dependency, and its output is GBNF in exactly the dialect ``llama_sampler_init_grammar`` parses
(xgrammar and llguidance emit their own grammar formats, which this llama.cpp build does not take).

That converter enforces some JSON-schema keywords and silently drops the rest, so every schema is
first walked against the keywords the branch the converter will take actually enforces: anything
else is a 400 naming the keyword and where it sits, never a grammar that only looks like it
enforces the schema. Local ``$ref``s are inlined (recursive ones are refused) so that several
schemas (one per tool) can share one grammar without their ``$defs`` colliding.
"""

from __future__ import annotations

import re
from typing import Any

from llama_cpp import llama_grammar as lg

from server.errors import InvalidRequest, Unsupported

# The converter module has no annotations; it is used through this one untyped name.
_SchemaConverter: Any = lg.SchemaConverter

# Keywords that describe a schema without constraining its instances: dropped before conversion.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "example",
        "$comment",
        "$schema",
        "$id",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
    }
)
# What the converter enforces on a string with a `format` (other formats would be plain strings).
ENFORCED_FORMATS = frozenset(
    {"date", "time", "date-time", "uuid", *(f"uuid{i}" for i in range(1, 6))}
)
PRIMITIVES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
MAX_GRAMMAR_CHARS = 256 * 1024  # the parser recurses per nesting level: bound what it is handed
_MAX_REF_DEPTH = 64
_TOKEN_REF = re.compile(r"!?<[^<>\s]+>")
_LITERAL_ESCAPE = re.compile(r'[\\"\x00-\x1f\x7f]')


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    return {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(
        c, f"\\x{ord(c):02x}"
    )


class _Walker:
    """Checks one schema against what the converter enforces, building the copy it converts."""

    def __init__(self, root: dict[str, Any], param: str):
        self.root, self.param = root, param

    def unsupported(self, keyword: str, path: str, why: str = "is not supported") -> Unsupported:
        return Unsupported(f"JSON schema keyword `{keyword}` at {path} {why}", param=self.param)

    def invalid(self, what: str) -> InvalidRequest:
        return InvalidRequest(f"JSON schema: {what}", param=self.param)

    def only(self, s: dict[str, Any], allowed: set[str], path: str, where: str) -> None:
        extra = sorted(set(s) - allowed)
        if extra:
            raise self.unsupported(extra[0], path, f"{where} is not supported")

    def resolve(self, ref: str, path: str) -> Any:
        if not ref.startswith("#"):
            raise self.unsupported("$ref", path, f"({ref!r}) must point inside the schema (#/...)")
        target: Any = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise self.invalid(f"`$ref` {ref!r} at {path} points nowhere")
            target = target[part]
        return target

    def clean(self, node: Any, path: str, refs: tuple[str, ...] = ()) -> dict[str, Any]:
        """A copy of ``node`` the converter enforces fully: annotations dropped, refs inlined."""
        if node is True:
            return {}
        if not isinstance(node, dict):
            raise self.invalid(f"the schema at {path} must be an object")
        s = {k: v for k, v in node.items() if k not in ANNOTATIONS}
        if "$ref" in s:
            ref = s.pop("$ref")
            self.only(s, set(), path, "beside `$ref`")
            if ref in refs or len(refs) >= _MAX_REF_DEPTH:
                raise self.unsupported(
                    "$ref", path, f"({ref!r}) is recursive, which is not supported"
                )
            return self.clean(self.resolve(ref, path), f"{path} → {ref}", (*refs, ref))
        if "oneOf" in s:
            raise self.unsupported("oneOf", path, "is not supported (use anyOf)")
        if "allOf" in s:
            raise self.unsupported("allOf", path)
        if "anyOf" in s:
            alts = s.pop("anyOf")
            self.only(s, set(), path, "beside `anyOf`")
            if not isinstance(alts, list) or not alts:
                raise self.invalid(f"`anyOf` at {path} must be a non-empty list")
            return {"anyOf": [self.clean(a, f"{path}/anyOf/{i}", refs) for i, a in enumerate(alts)]}
        t = s.get("type")
        if isinstance(t, list):
            self.only(s, {"type"}, path, "with a list of types")
            if not t or any(x not in PRIMITIVES for x in t):
                raise self.invalid(f"`type` at {path} must name JSON schema types")
            return s
        if t is not None and t not in PRIMITIVES:
            raise self.invalid(f"`type` {t!r} at {path} is not a JSON schema type")
        if "const" in s:
            self.only(s, {"const", "type"}, path, "beside `const`")
            return s
        if "enum" in s:
            self.only(s, {"enum", "type"}, path, "beside `enum`")
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise self.invalid(f"`enum` at {path} must be a non-empty list")
            return s
        if t in (None, "object") and ("properties" in s or "additionalProperties" in s):
            return self.clean_object(s, path, refs)
        if t in (None, "array") and ("items" in s or "prefixItems" in s):
            return self.clean_array(s, path, refs)
        if t in (None, "string") and "pattern" in s:
            self.only(s, {"type", "pattern"}, path, "beside `pattern`")
            p = s["pattern"]
            if not (isinstance(p, str) and p.startswith("^") and p.endswith("$")):
                raise self.unsupported("pattern", path, "must be anchored (^...$)")
            return s
        if t in (None, "string") and "format" in s:
            self.only(s, {"type", "format"}, path, "beside `format`")
            if s["format"] not in ENFORCED_FORMATS:
                raise self.unsupported("format", path, f"value {s['format']!r} is not supported")
            return s
        if t == "string" and ("minLength" in s or "maxLength" in s):
            self.only(s, {"type", "minLength", "maxLength"}, path, "on a string")
            return s
        self.only(s, {"type"}, path, f"on {'an untyped schema' if t is None else repr(t)}")
        return s

    def clean_object(self, s: dict[str, Any], path: str, refs: tuple[str, ...]) -> dict[str, Any]:
        self.only(
            s, {"type", "properties", "required", "additionalProperties"}, path, "on an object"
        )
        props = s.get("properties", {})
        required = s.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list):
            raise self.invalid(f"`properties`/`required` at {path} have the wrong type")
        missing = [r for r in required if r not in props]
        if missing:
            raise self.unsupported(
                "required", path, f"names {missing[0]!r}, which is not in `properties`"
            )
        extra = s.get("additionalProperties", False)  # the converter's default: no other keys
        if isinstance(extra, dict):
            extra = self.clean(extra, f"{path}/additionalProperties", refs)
        elif not isinstance(extra, bool):
            raise self.invalid(f"`additionalProperties` at {path} must be a schema")
        return {
            "type": "object",
            "properties": {
                k: self.clean(v, f"{path}/properties/{k}", refs) for k, v in props.items()
            },
            "required": list(required),
            "additionalProperties": extra,
        }

    def clean_array(self, s: dict[str, Any], path: str, refs: tuple[str, ...]) -> dict[str, Any]:
        if "prefixItems" in s or isinstance(s.get("items"), list):
            # A tuple: the converter emits exactly these items, which every such schema accepts
            # unless it bounds the length or constrains further items.
            key = "prefixItems" if "prefixItems" in s else "items"
            allowed = {"type", key} | ({"items"} if s.get("items") is False else set())
            self.only(s, allowed, path, "on a tuple array")
            items = [self.clean(x, f"{path}/{key}/{i}", refs) for i, x in enumerate(s[key])]
            return {"type": "array", "prefixItems": items}
        self.only(s, {"type", "items", "minItems", "maxItems"}, path, "on an array")
        bounds = {k: v for k, v in s.items() if k in ("minItems", "maxItems")}
        return {"type": "array", "items": self.clean(s["items"], f"{path}/items", refs), **bounds}


def check_schema(schema: Any, *, param: str = "response_format") -> dict[str, Any]:
    """A copy of ``schema`` that the converter enforces completely (annotations dropped, local
    ``$ref``s inlined), or ``Unsupported`` (400) naming the first keyword it would not enforce."""
    if not isinstance(schema, dict):
        raise InvalidRequest("a JSON schema must be an object", param=param)
    return _Walker(schema, param).clean(schema, "#")


class GrammarBuilder:
    """Composes one GBNF grammar from JSON schemas and literal text (tool-call formats).

    >>> b = GrammarBuilder()
    >>> b.root(b.literal("<x>") + " " + b.schema({"type": "integer"}, "n", param="tools"))
    """

    def __init__(self) -> None:
        self._conv: Any = _SchemaConverter(
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )

    def schema(self, schema: Any, name: str, *, param: str) -> str:
        """Adds the rules for a JSON schema; returns the name of the rule matching an instance."""
        clean = check_schema(schema, param=param)
        try:
            return str(self._conv.visit(clean, name))
        except (AssertionError, ValueError, KeyError, RecursionError) as e:
            raise Unsupported(
                f"the JSON schema cannot be turned into a grammar: {e}", param=param
            ) from e

    def rule(self, name: str, body: str) -> str:
        """Adds ``name ::= body`` (renamed if taken by a different body); returns its name."""
        return str(self._conv._add_rule(name, body))

    @staticmethod
    def literal(text: str) -> str:
        """A GBNF string literal matching ``text`` exactly."""
        return '"' + _LITERAL_ESCAPE.sub(_escape, text) + '"'

    def root(self, body: str) -> str:
        """The whole grammar, with ``root ::= body``."""
        self._conv._rules["root"] = body
        return str(self._conv.format_grammar())


def schema_to_gbnf(schema: Any, *, param: str = "response_format") -> str:
    """GBNF matching exactly the JSON instances of ``schema`` (400 if it cannot be enforced)."""
    b = GrammarBuilder()
    return b.root(b.schema(schema, "json", param=param))


def json_object_gbnf() -> str:
    """GBNF for any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    b = GrammarBuilder()
    return b.root(b.schema({"type": "object"}, "json", param="response_format"))


def check_gbnf(gbnf: str, *, param: str = "grammar", vocab: Any = None) -> str:
    """``gbnf`` if llama.cpp's grammar sampler accepts it, else ``InvalidRequest`` (400).

    Parsed by ``llama_sampler_init_grammar`` itself, so the check is the decode loop's own. With
    ``vocab`` (a ``llama_vocab`` pointer) token references such as ``<|im_end|>`` resolve; without
    one, a grammar that may use them is left to the engine, which parses it with its vocabulary.
    """
    import llama_cpp

    if not isinstance(gbnf, str) or not gbnf.strip():
        raise InvalidRequest("grammar is empty", param=param)
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"grammar is longer than {MAX_GRAMMAR_CHARS} characters", param=param)
    if "\x00" in gbnf:
        raise InvalidRequest("grammar contains a NUL character", param=param)
    if not re.search(r"(?m)^\s*root\s*::=", gbnf):
        raise InvalidRequest("grammar has no `root ::= ...` rule", param=param)
    if vocab is None and _TOKEN_REF.search(gbnf):
        # Token references (<|im_end|>, <[42]>) need the model's vocabulary: the engine parses
        # the grammar with it when the request is submitted, and a failure there is a 400 too.
        return gbnf
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        raise InvalidRequest(
            "grammar is not valid GBNF (llama.cpp could not parse it; see "
            "https://github.com/ggml-org/llama.cpp/blob/master/grammars/README.md)",
            param=param,
        )
    llama_cpp.llama_sampler_free(sampler)
    return gbnf
