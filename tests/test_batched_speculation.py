"""Prompt-lookup speculation inside the batched engine: each greedy sequence drafts into the
step that decodes the others, and its text stays the plain greedy text.

The real-model tests force drafting (``draft_adaptive = false``): on a loaded 2-core CPU the cost
model may rightly decide that drafting does not pay, which would leave nothing to verify.
Planning and drafters without a model: test_batch_drafts.py.
"""

from __future__ import annotations

import json
import queue
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.speculative import derived_gguf
from server.engine.base import (
    CallbackSink,
    Delta,
    End,
    Finished,
    GenerationRequest,
    SamplingParams,
    Speculation,
)
from server.engine.batched import BatchedEngine
from server.engine.model import Model
from server.registry import parse_registry
from tests.conftest import REPO, LiveServer, make_settings
from tests.test_api_errors import assert_error
from tests.test_batched import first_divergence_gap
from tests.test_metrics import scrape, value
from tests.test_speculative import PROMPTS

# -- the real model, through HTTP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def batched(model_path: Path, tmp_path_factory) -> Iterator[LiveServer]:
    q4_0 = derived_gguf(model_path, "Q4_0", tmp_path_factory.mktemp("drafts"))
    raw = tomllib.loads((REPO / "models.toml").read_text())
    smol = {"source": {"path": str(model_path)}, "n_ctx": 1024, "kv_cache": "q8_0"}
    raw["models"].update(
        {
            "lookup": {**smol, "speculative": "prompt_lookup", "draft_adaptive": False},
            "plain": {**smol},
            "q4-draft": {**smol, "source": {"path": str(q4_0)}},
            "with-q4": {**smol, "draft": "q4-draft", "draft_adaptive": False, "draft_max": 4},
            "self-draft": {**smol},
            "with-self": {**smol, "draft": "self-draft", "draft_adaptive": False},
            "with-gemma": {**smol, "draft": "gemma3-270m"},
        }
    )
    live = LiveServer(make_settings(engine="auto"), parse_registry(raw, REPO / "models.toml"))
    yield live.start()
    live.stop()


@pytest.fixture()
def http(batched: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=batched.url, timeout=300) as c:
        yield c


def complete(
    http: httpx.Client, prompt: str, mode: str | None, model: str = "lookup", **extra
) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0}
    r = http.post("/v1/completions", json={**body, "speculative": mode, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def assert_greedy_match(plain: dict, tokens: list[str], finish: str | None = None) -> None:
    """Speculation keeps the plain greedy tokens. Drafted tokens are evaluated several to a
    batch, and llama.cpp's kernels differ slightly across batch shapes (as for batching), so the
    runs may part only where the plain run's two best tokens nearly tie."""
    gap = first_divergence_gap(plain, tokens)
    assert gap is None or gap < 0.3, (gap, plain["logprobs"]["tokens"], tokens)
    if gap is None and finish is not None:
        assert finish == plain["finish_reason"]


def counters(http: httpx.Client, model: str = "lookup") -> tuple[float, ...]:
    s = scrape(http)
    names = (
        "llamacpp:spec_decode_num_draft_tokens_total",
        "llamacpp:spec_decode_num_accepted_tokens_total",
        "codeserve_decode_target_passes_total",
        "llamacpp:tokens_predicted_total",
    )
    return tuple(value(s, n, model=model) for n in names)


def test_auto_serves_a_prompt_lookup_model_with_the_batched_engine(http):
    slots = http.get("/slots", params={"model": "lookup"})
    assert slots.status_code == 200, slots.text
    assert len(slots.json()) > 1  # one per sequence: the batched engine


def test_a_lone_stream_drafts_and_keeps_the_plain_greedy_text(http):
    before = counters(http)
    for prompt in PROMPTS:
        plain = complete(http, prompt, "off", logprobs=2)["choices"][0]
        fast = complete(http, prompt, "prompt_lookup", logprobs=1)["choices"][0]
        assert_greedy_match(plain, fast["logprobs"]["tokens"], fast["finish_reason"])
    drafted, accepted, passes, predicted = (
        a - b for a, b in zip(counters(http), before, strict=True)
    )
    assert drafted >= accepted > 0
    assert passes < predicted


def test_eight_speculating_streams_match_their_plain_solo_runs(http):
    prompts = [f"{PROMPTS[0]}# variant {i}\n" if i % 2 else f"def f{i}(x):\n" for i in range(8)]
    alone = [complete(http, p, "off", logprobs=2)["choices"][0] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda p: complete(http, p, "prompt_lookup", logprobs=1)["choices"][0], prompts
            )
        )
    gaps = [
        first_divergence_gap(a, t["logprobs"]["tokens"])
        for a, t in zip(alone, together, strict=True)
    ]
    # As for plain batching: rows computed in another batch shape may differ slightly, so a
    # stream may part from its solo run only where its two best tokens nearly tie.
    assert all(g is None or g < 0.3 for g in gaps), gaps
    assert any(g is None for g in gaps), gaps


def test_stop_strings_logprobs_and_streams_match_plain(http):
    extra = {"stop": ["return"], "logprobs": 2}
    plain = complete(http, PROMPTS[0], "off", **extra)["choices"][0]
    fast = complete(http, PROMPTS[0], "prompt_lookup", **extra)["choices"][0]
    assert_greedy_match(plain, fast["logprobs"]["tokens"], fast["finish_reason"])
    if fast["logprobs"]["tokens"] == plain["logprobs"]["tokens"]:
        assert fast["text"] == plain["text"]  # the stop string cut both alike
    body = {
        "model": "lookup",
        "prompt": PROMPTS[0],
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
        "logprobs": 1,
    }
    text, tokens = "", []
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text += choice["text"]
                tokens += choice["logprobs"]["tokens"] if choice["logprobs"] else []
    assert text
    plain = complete(http, PROMPTS[0], "off", logprobs=2)["choices"][0]
    assert_greedy_match(plain, tokens)


def test_a_grammar_constrains_speculative_output_as_it_does_plain(http):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
        "required": ["name", "size"],
    }
    extra = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    }
    prompt = 'A JSON object for a file: {"name": "config.toml", "size": 12}. Another one:'
    plain = complete(http, prompt, "off", logprobs=2, **extra)["choices"][0]
    fast = complete(http, prompt, "prompt_lookup", logprobs=1, **extra)["choices"][0]
    assert_greedy_match(plain, fast["logprobs"]["tokens"], fast["finish_reason"])
    json.loads(fast["text"])  # the grammar held for the drafted tokens too


def _engine(model_path: Path) -> BatchedEngine:
    raw = {"source": {"path": str(model_path)}, "n_ctx": 1024, "draft_adaptive": False}
    cfg = parse_registry({"default_model": "t", "models": {"t": raw}}, REPO / "x.toml")
    return BatchedEngine(Model.load(model_path, cfg.models["t"]), slots=2)


def _greedy(engine: BatchedEngine, text: str, mode: str, max_tokens: int = 48) -> tuple[str, int]:
    """(text, cached prompt tokens) of one greedy request through the engine contract."""
    events: queue.Queue = queue.Queue()
    prompt = engine.tokenize(text, add_bos=False)
    req = GenerationRequest(
        prompt, max_tokens, SamplingParams(temperature=0), speculation=Speculation(mode=mode)
    )
    engine.submit(req, CallbackSink(events.put))
    out, cached = "", -1
    while not isinstance(ev := events.get(timeout=120), End):
        if isinstance(ev, Delta):
            out += ev.text
        elif isinstance(ev, Finished):
            cached = ev.timings.cached_tokens
    assert ev.error is None
    return out, cached


def test_rolled_back_cells_leave_the_cache_exact_for_the_next_request(model_path):
    """A follow-up that reuses the cache a speculating request left answers exactly what a
    fresh engine answers (fresh engines: no other sequence's batches in the history)."""
    engine = _engine(model_path)
    try:
        first, _ = _greedy(engine, PROMPTS[0], "prompt_lookup", max_tokens=40)
        follow = PROMPTS[0] + first[:60]
        warm, cached = _greedy(engine, follow, "off")
    finally:
        engine.close()
    fresh = _engine(model_path)
    try:
        cold, _ = _greedy(fresh, follow, "off")
    finally:
        fresh.close()
    assert cached > len(first[:60]) // 8  # the prompt and the kept output were reused
    assert warm == cold


def test_a_draft_request_on_a_model_without_a_draft_model_is_a_400(http):
    r = http.post(
        "/v1/completions",
        json={"model": "lookup", "prompt": "x", "max_tokens": 4, "speculative": "draft"},
    )
    assert_error(r, 400, param="speculative", contains="has no draft model")


# -- a draft model in the batch -------------------------------------------------------------


@pytest.mark.parametrize("model", ["with-q4", "with-self"])
def test_a_draft_model_drafts_in_the_batch_and_keeps_the_plain_greedy_text(http, model):
    slots = http.get("/slots", params={"model": model})
    assert slots.status_code == 200 and len(slots.json()) > 1  # "auto": the batched engine
    before = counters(http, model)
    for prompt in PROMPTS:
        plain = complete(http, prompt, "off", model, logprobs=2)["choices"][0]
        fast = complete(http, prompt, "draft", model, logprobs=1)["choices"][0]
        assert_greedy_match(plain, fast["logprobs"]["tokens"], fast["finish_reason"])
    drafted, accepted, passes, predicted = (
        a - b for a, b in zip(counters(http, model), before, strict=True)
    )
    assert drafted >= accepted > 0 and passes < predicted
    if model == "with-self":
        # A model drafting for itself agrees with itself on nearly every token, which holds only
        # if its sequence followed the target's text exactly (rejected cells dropped).
        assert accepted >= 0.9 * drafted


@pytest.mark.parametrize("model", ["with-q4", "with-self"])
def test_eight_streams_drafting_with_a_model_match_their_plain_solo_runs(http, model):
    """The streams draft in shared passes of the draft model (rows and positions per sequence:
    test_sequences_draft_together_one_pass_per_token)."""
    prompts = [f"{PROMPTS[1]}# variant {i}\n" if i % 2 else f"def g{i}(x):\n" for i in range(8)]
    alone = [complete(http, p, "off", model, logprobs=2)["choices"][0] for p in prompts]
    before = counters(http, model)
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda p: complete(http, p, "draft", model, logprobs=1)["choices"][0],
                prompts,
            )
        )
    gaps = [
        first_divergence_gap(a, t["logprobs"]["tokens"])
        for a, t in zip(alone, together, strict=True)
    ]
    # Verify batches of up to 5 tokens per stream drift further from the solo run than plain
    # steps do: measured, the eighth stream's 48th token moved by 0.25 nats against its solo
    # run (-0.92 → -0.67 in one batch, -0.74 in another), where the solo run's two best tokens
    # are 0.31 apart; that token flipped in about one run of ten, and in every run once its
    # first token came from the row kept after its prompt. Once in CI (a busy machine, frames
    # and thread counts as landed on 2026-11-23) a stream parted at a token 0.45 behind the best.
    # A wrong cell moves logits by nats.
    assert all(g is None or g < 0.5 for g in gaps), gaps
    assert any(g is None for g in gaps), gaps
    after = counters(http, model)
    drafted, accepted = after[0] - before[0], after[1] - before[1]
    assert drafted >= accepted > 0
    if model == "with-self":
        # A model drafting for itself in batches of 8 (its target verifies in batches of up to
        # 40) parts from it at near-ties: 81-87% kept, measured before and after the draft's
        # passes were shared.
        assert accepted >= 0.7 * drafted


def test_a_draft_model_with_another_vocabulary_is_refused_at_load(http):
    r = http.post("/v1/completions", json={"model": "with-gemma", "prompt": "x", "max_tokens": 4})
    err = assert_error(r, 503, contains="vocabularies differ")
    assert "with-gemma" in err["message"] and "gemma3-270m" in err["message"]
