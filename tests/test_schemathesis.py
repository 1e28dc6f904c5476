"""Property-based tests of every route against the server's own OpenAPI document (schemathesis).

Schemathesis generates requests from the document, valid and invalid ones, and checks each answer:
no 5xx, a status, content type, headers and body the document promises, invalid data rejected.
Generation budgets are clamped so each example costs a few tokens of the real model, and model
names are kept to resident ones so no example starts a download.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import LiveServer

MAX_EXAMPLES = 25
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


@pytest.fixture(scope="session")
def api_schema(server: LiveServer):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.generation.update(modes=["positive", "negative"], max_examples=MAX_EXAMPLES)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


def _bounded(case, server: LiveServer) -> None:
    """Keep an example cheap: a few tokens, a couple of choices, no model downloads."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in TOKEN_FIELDS:
        if type(body.get(key)) is int and body[key] > 4:
            body[key] = 4
    if type(body.get("n")) is int and body["n"] > 2:
        body["n"] = 2
    manager = server.app.state.manager
    model = body.get("model")
    if isinstance(model, str) and manager.registry.get(model) and not manager.is_loaded(model):
        body["model"] = manager.default_model
    # A time budget too: a schema-valid request may still ask for thousands of tokens of text.
    if "t_max_predict_ms" not in body:
        body["t_max_predict_ms"] = 2000


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=MAX_EXAMPLES)
def test_every_route_keeps_its_documented_promises(case, server: LiveServer):
    _bounded(case, server)
    case.call_and_validate(timeout=60)
