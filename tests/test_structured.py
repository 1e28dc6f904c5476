"""Structured output, logit bias, ignore_eos and refused fields on the real model, over HTTP with
the official openai SDK (and raw HTTP for llama-server's extra fields)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

MODEL = "smollm2-135m"
CHAT_PROMPT = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"


class Person(BaseModel):
    name: str
    age: int


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_parse_returns_a_pydantic_object(openai_client):
    out = openai_client.chat.completions.parse(
        model=MODEL,
        messages=ask('Reply with a JSON object with keys "name" and "age" for Alice, 30.'),
        response_format=Person,
        temperature=0,
        max_tokens=60,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"  # the grammar ends the sequence once the object closes
    assert isinstance(choice.message.parsed, Person)


def test_json_object_output_parses(openai_client):
    out = openai_client.chat.completions.create(
        model=MODEL,
        messages=ask('Return JSON with one key "ok" set to true.'),
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_json_schema_with_an_unsupported_keyword_is_a_400(openai_client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(
            model=MODEL,
            messages=ask("A number"),
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )
    err = e.value.body
    assert "`minimum`" in err["message"] and err["param"] == "response_format.json_schema.schema"
    assert err["code"] == "unsupported_parameter"


def test_json_schema_field_on_completions_validates(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    body = {
        "prompt": "The answer as JSON:",
        "json_schema": schema,
        "max_tokens": 40,
        "temperature": 0,
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), schema)


def test_llama_server_grammar_on_completions_and_chat(client):
    gbnf = 'root ::= "yes" | "no"'
    r = client.post(
        "/v1/completions",
        json={"prompt": "Is the sky blue? Answer:", "grammar": gbnf, "max_tokens": 10},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")
    r = client.post(
        "/v1/chat/completions",
        json={"messages": ask("Is the sky blue?"), "grammar": gbnf, "max_tokens": 10},
    )
    assert r.json()["choices"][0]["message"]["content"] in ("yes", "no")


@pytest.mark.parametrize("gbnf", ["root ::= undefined", 'root ::= ("a"', 'x ::= "a"'])
def test_bad_grammar_is_a_400(client, gbnf):
    r = client.post("/v1/completions", json={"prompt": "x", "grammar": gbnf, "max_tokens": 4})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "grammar"


def test_two_output_constraints_are_a_400(client):
    body = {"prompt": "x", "grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"


@pytest.fixture(scope="module")
def vocab(model_path):
    """The default model's tokenizer, to name tokens by id as logit_bias does."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)


def test_logit_bias_bans_and_forces_a_token(openai_client, vocab):
    prompt = "def add(a, b):\n    return"
    common = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    first = openai_client.completions.create(**common, logprobs=0).choices[0].logprobs.tokens[0]
    (first_id,) = vocab.tokenize(first.encode(), add_bos=False, special=False)
    banned = openai_client.completions.create(
        **common, logprobs=0, logit_bias={str(first_id): -100}
    )
    assert banned.choices[0].logprobs.tokens[0] != first
    (hello,) = vocab.tokenize(b" hello", add_bos=False, special=False)
    forced = openai_client.completions.create(**common, logit_bias={str(hello): 100})
    assert forced.choices[0].text == " hello" * 3


def test_logit_bias_out_of_range_is_a_400(client):
    for bias, param in (
        ({"49152000": 5}, "logit_bias"),
        ({"12": 101}, "logit_bias.12"),
        ({"x": 1}, "logit_bias.x"),
    ):
        r = client.post("/v1/completions", json={"prompt": "x", "logit_bias": bias})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_ignore_eos_runs_to_max_tokens(client):
    body = {"prompt": CHAT_PROMPT, "max_tokens": 40, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    assert plain["choices"][0]["finish_reason"] == "stop"  # the reply ends with <|im_end|>
    forced = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    assert forced["choices"][0]["finish_reason"] == "length"
    assert forced["usage"]["completion_tokens"] == 40


def test_n_predict_is_max_tokens(client):
    r = client.post("/v1/completions", json={"prompt": "Once upon a time", "n_predict": 5})
    assert r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["choices"][0]["finish_reason"] == "length"
    bad = client.post("/v1/completions", json={"prompt": "x", "n_predict": 5, "max_tokens": 6})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n_predict"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
        ("web_search_options", {}),
        ("moderation", {"model": "omni-moderation-latest"}),
    ],
)
def test_refused_chat_fields_are_a_400_naming_them(client, field, value):
    r = client.post(
        "/v1/chat/completions", json={"messages": ask("hi"), "max_tokens": 2, field: value}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_refused_completion_fields_and_content_parts(client):
    r = client.post("/v1/completions", json={"prompt": "x", "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": [image]}], "max_tokens": 2},
    )
    assert r.status_code == 400 and "messages" in r.json()["error"]["param"]


def test_accepted_no_op_fields(openai_client):
    out = openai_client.chat.completions.create(
        model=MODEL,
        messages=ask("hi"),
        max_tokens=2,
        user="u1",
        store=False,
        metadata={"k": "v"},
        modalities=["text"],
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
    )
    assert out.choices[0].message.content is not None


def test_ignore_eos_with_a_grammar_is_a_400(client):
    body = {"prompt": "x", "grammar": 'root ::= "a"', "ignore_eos": True, "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"
