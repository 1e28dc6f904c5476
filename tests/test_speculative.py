"""Speculative decoding on the real model, through HTTP: greedy output is the plain output.

One module-scoped server holds SmolLM2 several times over: once to decode with prompt lookup,
once with a Q4_0 build of itself as the draft, once with itself as the draft, once with Gemma 3
(another vocabulary) as the draft, which must be refused. The q8_0 KV cache (with flash attention)
is what makes a row computed inside a verify batch bit-identical to one computed alone, so the
texts must match exactly; drafting is forced (``draft_adaptive = false``) where the cost model
would otherwise, on a slow CPU, decide not to draft at all.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.speculative import derived_gguf
from server.engine.costmodel import AdaptiveK, CostModel, refit
from server.engine.drafters import PromptLookup
from server.errors import ConfigError
from server.registry import parse_registry
from server.settings import ServerSettings
from tests.conftest import REPO, LiveServer, make_settings
from tests.test_api_errors import assert_error
from tests.test_metrics import scrape, value

CODE = """def parse_config(path):
    with open(path) as f:
        lines = f.readlines()
    config = {}
    for line in lines:
        key, value = line.split("=")
        config[key.strip()] = value.strip()
    return config
"""
PROMPTS = [
    f"{CODE}\n# The same function with `config` renamed to `settings`:\n",
    "def fibonacci(n):\n",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n"
    "<|im_start|>assistant\n",
]


def _simple_engine(**overrides) -> ServerSettings:
    # Speculation lives in the simple engine; a batched default would not speculate.
    if "engine" in ServerSettings.model_fields:
        overrides.setdefault("engine", "simple")
    return make_settings(**overrides)


@pytest.fixture(scope="module")
def spec_server(model_path: Path, tmp_path_factory) -> Iterator[LiveServer]:
    q4_0 = derived_gguf(model_path, "Q4_0", tmp_path_factory.mktemp("drafts"))
    raw = tomllib.loads((REPO / "models.toml").read_text())
    smol = {"source": {"path": str(model_path)}, "n_ctx": 2048, "kv_cache": "q8_0"}
    raw["models"].update(
        {
            "lookup": {**smol, "speculative": "prompt_lookup"},
            "plain": {**smol},
            "q4-draft": {**smol, "source": {"path": str(q4_0)}},
            "with-q4": {**smol, "draft": "q4-draft", "draft_adaptive": False, "draft_max": 4},
            "self-draft": {**smol},
            "with-self": {**smol, "draft": "self-draft", "draft_adaptive": False},
            "with-gemma": {**smol, "draft": "gemma3-270m"},
        }
    )
    registry = parse_registry(raw, REPO / "models.toml")
    live = LiveServer(_simple_engine(), registry).start()
    yield live
    live.stop()


@pytest.fixture()
def http(spec_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=spec_server.url, timeout=180) as c:
        yield c


def complete(http: httpx.Client, model: str, prompt: str, mode: str, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0}
    r = http.post("/v1/completions", json={**body, "speculative": mode, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def spec_counters(http: httpx.Client, model: str) -> tuple[float, float, float, float]:
    s = scrape(http)
    return (
        value(s, "llamacpp:spec_decode_num_draft_tokens_total", model=model),
        value(s, "llamacpp:spec_decode_num_accepted_tokens_total", model=model),
        value(s, "codeserve_decode_target_passes_total", model=model),
        value(s, "llamacpp:tokens_predicted_total", model=model),
    )


def test_prompt_lookup_is_token_for_token_plain_greedy(http):
    before = spec_counters(http, "lookup")
    for prompt in PROMPTS:
        plain = complete(http, "lookup", prompt, "off")["choices"][0]["text"]
        fast = complete(http, "lookup", prompt, "prompt_lookup")["choices"][0]["text"]
        assert fast == plain, prompt
    drafted, accepted, passes, predicted = (
        a - b for a, b in zip(spec_counters(http, "lookup"), before, strict=True)
    )
    # The rename copies its input, so lookup drafts and some drafts survive; fewer target
    # passes than tokens is the point.
    assert drafted >= accepted > 0
    assert passes < predicted


def test_the_models_default_mode_applies_and_off_turns_it_off(http):
    d0 = spec_counters(http, "lookup")[0]
    complete(http, "lookup", PROMPTS[0], None)  # the model says prompt_lookup
    d1 = spec_counters(http, "lookup")[0]
    complete(http, "lookup", PROMPTS[0], "off")
    d2 = spec_counters(http, "lookup")[0]
    assert d1 > d0 and d2 == d1


@pytest.mark.parametrize("model", ["with-q4", "with-self"])
def test_draft_model_is_token_for_token_plain_greedy(http, model):
    before = spec_counters(http, model)
    for prompt in PROMPTS:
        plain = complete(http, model, prompt, "off")["choices"][0]["text"]
        fast = complete(http, model, prompt, "draft")["choices"][0]["text"]
        assert fast == plain, prompt
    drafted, accepted, passes, predicted = (
        a - b for a, b in zip(spec_counters(http, model), before, strict=True)
    )
    assert drafted >= accepted > 0 and passes < predicted
    if model == "with-self":
        # A model drafting for itself agrees with itself on every token, which holds only if
        # both KV caches were rolled back exactly.
        assert accepted == drafted


def test_streaming_stop_strings_and_logprobs_match_plain(http):
    extra = {"stop": ["return"], "logprobs": 2}
    plain = complete(http, "lookup", PROMPTS[0], "off", **extra)["choices"][0]
    fast = complete(http, "lookup", PROMPTS[0], "prompt_lookup", **extra)["choices"][0]
    assert fast["text"] == plain["text"] and fast["finish_reason"] == plain["finish_reason"]
    # the verify pass's rows are the very rows a plain step computes
    assert fast["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    body = {
        "model": "lookup",
        "prompt": PROMPTS[0],
        "max_tokens": 48,
        "temperature": 0,
        "speculative": "prompt_lookup",
        "stream": True,
    }
    text = ""
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
    assert text == complete(http, "lookup", PROMPTS[0], "off")["choices"][0]["text"]


def test_the_cache_after_speculation_serves_the_next_request(http):
    """Rollback must leave the KV cache exactly as the tokens say: a follow-up that reuses it
    answers what a fresh context answers."""
    first = complete(http, "lookup", PROMPTS[0], "prompt_lookup", max_tokens=40)
    follow = PROMPTS[0] + first["choices"][0]["text"][:60]
    warm = complete(http, "lookup", follow, "off")
    cold = complete(http, "plain", follow, "off")
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]


def test_sampled_requests_decode_plainly(http):
    drafted = spec_counters(http, "lookup")[0]
    r = complete(http, "lookup", PROMPTS[0], "prompt_lookup", temperature=0.8, seed=3)
    assert r["choices"][0]["text"]
    assert spec_counters(http, "lookup")[0] == drafted  # only greedy output is verified


def test_draft_mode_on_a_model_without_draft_is_a_400(http):
    r = http.post(
        "/v1/completions",
        json={"model": "plain", "prompt": "x", "max_tokens": 4, "speculative": "draft"},
    )
    assert_error(r, 400, param="speculative", contains="has no draft model")


def test_a_draft_with_another_vocabulary_is_refused_at_load(http):
    r = http.post("/v1/completions", json={"model": "with-gemma", "prompt": "x", "max_tokens": 4})
    err = assert_error(r, 503, contains="vocabularies differ")
    assert "with-gemma" in err["message"] and "gemma3-270m" in err["message"]
    assert "49152 tokens" in err["message"]


def test_speculative_draft_needs_a_draft_model_in_the_registry(tmp_path):
    raw = {
        "default_model": "a",
        "models": {"a": {"source": {"path": "a.gguf"}, "speculative": "draft"}},
    }
    with pytest.raises(ConfigError, match=r'models."a".speculative: "draft" needs a draft'):
        parse_registry(raw, tmp_path / "models.toml")


# -- the parts without a model ---------------------------------------------------------------

COST = CostModel(step_s=0.01, verify={1: 1.0, 2: 1.3, 3: 1.5, 5: 1.9, 9: 2.6, 17: 4.0, 33: 7.0})


def test_cost_model_predicts_from_acceptance_and_verify_cost():
    assert COST.verify_cost(4) == pytest.approx(1.7)  # interpolated between 3 and 5
    assert COST.expected_tokens(1.0, 4) == 5
    assert COST.expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert COST.speedup(0.9, 4) == pytest.approx((1 - 0.9**5) / 0.1 / 1.9)
    assert COST.best_k(0.1, 16)[0] == 0  # rarely right: plain decoding
    k_high, s_high = COST.best_k(0.95, 32)
    assert k_high >= 8 and s_high > 2
    drafty = CostModel(0.01, COST.verify, draft=0.9)  # a draft nearly as slow as the target
    assert drafty.best_k(1.0, 32)[0] == 0


def test_refit_follows_the_steps_seen_since_calibration():
    # Calibrated while the one-token step ran slow (10 ms): batches looked cheap.
    seen = {1: [0.0075, 0.0077, 0.0076], 5: [0.020, 0.021, 0.019], 9: [0.018, 0.019, 0.018]}
    seen[17] = [0.05, 0.05]  # seen too rarely: keeps its calibrated ratio
    fit = refit(COST, seen)
    assert fit.step_s == pytest.approx(0.0076)
    assert fit.verify[5] == pytest.approx(0.020 / 0.0076)
    assert fit.verify[9] == fit.verify[5]  # never cheaper than a smaller batch
    assert fit.verify[3] == 1.5 and fit.verify[17] == COST.verify[17]
    assert fit.verify_cost(4) > COST.verify_cost(4)
    assert fit.best_k(0.9, 32)[1] < COST.best_k(0.9, 32)[1]  # speculation pays less than it seemed
    assert refit(COST, {}) == COST


def test_adaptive_k_backs_off_and_recovers():
    ctl = AdaptiveK(COST, lambda _key: 0.8)
    k, _ = ctl.choose("a", 16)
    assert k > 0
    for _ in range(10):
        ctl.observe("a", k, 0)
    assert ctl.choose("a", 16, probe=False) == (0, False)
    choices = [ctl.choose("a", 16) for _ in range(8)]
    assert choices.count((2, True)) == 1  # a draft model is re-tried after a few plain steps
    for _ in range(10):
        ctl.observe("a", 2, 2)
    assert ctl.choose("a", 16)[0] > 2


def test_prompt_lookup_follows_the_copy():
    lookup = PromptLookup()
    source = [10, 11, 12, 13, 14, 15, 16, 17]
    lookup.begin([*source, 99, 10, 11, 12])  # "... rewritten:" then the copy starts
    found = lookup.lookup()
    assert found is not None and lookup.propose(found, 3) == [13, 14, 15]
    lookup.follow(found, 1)  # 13 kept, then an edit replaced 14
    lookup.extend([13, 42])
    found = lookup.lookup()  # nothing ends in 42 before: no proposal
    assert found is None
    lookup.extend([15])  # the copy resumes right after the edit
    found = lookup.lookup()
    assert found is not None and lookup.propose(found, 2) == [16, 17]
