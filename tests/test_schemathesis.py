"""Property-based tests of every route against the server's own OpenAPI document (schemathesis).

Schemathesis generates requests from the document, valid and invalid ones, and checks each answer:
no 5xx, a status, content type, headers and body the document promises, invalid data rejected.
Generation budgets are clamped so each example costs a few tokens of the real model, and model
names are kept to resident ones so no example starts a download.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import LiveServer

MAX_EXAMPLES = 25
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")  # n_predict: llama-server's


def _safe_model(value: object, server: LiveServer) -> object:
    """A registered model that is not resident would be fetched (a download): use the default."""
    manager = server.app.state.manager
    if isinstance(value, str) and manager.registry.get(value) and not manager.is_loaded(value):
        return manager.default_model
    return value


def _bounded(case, server: LiveServer) -> None:
    """Keep an example cheap: a few tokens, a couple of choices, no model downloads."""
    if isinstance(case.path_parameters, dict) and "name" in case.path_parameters:
        case.path_parameters["name"] = _safe_model(case.path_parameters["name"], server)
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("model", "name"):
        if key in body:
            body[key] = _safe_model(body[key], server)
    for key in TOKEN_FIELDS:
        if type(body.get(key)) is int and (body[key] > 4 or body[key] == -1):  # -1: no limit
            body[key] = 4
    if type(body.get("n")) is int and body["n"] > 2:
        body["n"] = 2
    if case.path.startswith("/api/"):  # Ollama: the budget is options.num_predict
        if body.get("options") is None:
            body["options"] = {}
        options = body["options"]
        if isinstance(options, dict):
            predict = options.get("num_predict")
            if not (type(predict) is int and 0 <= predict <= 4):
                options["num_predict"] = 4
        return
    # A time budget too: without max_tokens a valid request may ask for the whole context.
    budget = body.get("t_max_predict_ms")
    if budget is None or (type(budget) is int and budget > 2000):
        body["t_max_predict_ms"] = 2000


# Pydantic's wording: a 400 with it means the request failed validation, not a rule of the server.
VALIDATION_WORDS = ("Input should", "Field required", "Value error", "valid JSON", "List should")


def schema_valid_requests_pass_validation(ctx, response, case) -> None:
    """Schemathesis' own check expects no 400 for a schema-valid request; but some are refused on
    rules a JSON schema cannot state (a prompt longer than the context, `suffix` on a model without
    FIM tokens, `echo` with `logprobs`). Such a 400 is fine; failing validation is not."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if response.status_code == 400:
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error  # OpenAI's or Ollama's
        assert not any(w in message for w in VALIDATION_WORDS), (
            f"a schema-valid request failed validation: {message}"
        )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_keeps_its_documented_promises(server: LiveServer, mode: GenerationMode):
    # The schema comes from the live server, so one test walks every route it has (the pytest
    # plugin's fixture loader does not run under this pytest).
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: dict[str, BaseException] = {}
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same examples every run: CI fails only on a real change
            phases=[Phase.explicit, Phase.generate],  # no shrinking: the report shows the case
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            _bounded(case, server)
            case.call_and_validate(
                timeout=300,  # a valid prompt may fill the context: minutes of prefill
                excluded_checks=[positive_data_acceptance],
                additional_checks=[schema_valid_requests_pass_validation],
            )

        try:
            check()
        except Unsatisfiable:  # nothing in this operation can be made invalid (negative mode)
            continue
        except Exception as e:  # collected so one run reports every route
            failures[operation.label] = e
    assert len(labels) >= 5, labels
    assert not failures, "\n\n".join(f"{label}: {e}" for label, e in failures.items())
