"""llama-server's /infill on the real model, as llama.vscode and llama.vim call it."""

from __future__ import annotations

import time
import uuid

from tests.conftest import FIM_MODEL
from tests.llamacpp_client import (
    PREFIX,
    SUFFIX,
    assert_llama_error,
    sse_events,
    vscode_infill,
    vscode_warmup,
)

# -- /infill: llama.vscode and llama.vim -----------------------------------------------------


def test_llama_vscode_infill_request(fim):
    r = fim.post("/infill", json=vscode_infill(PREFIX, SUFFIX, "return", 4))
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["content"], str) and out["stop"] is True
    assert out["model"] == FIM_MODEL
    assert out["stop_type"] in ("eos", "limit", "word")
    # The body samples (top_k 40, top_p 0.99): an end token first (p ~ 0.008 here) is an answer.
    assert 0 < out["tokens_predicted"] <= 128 or (out["stop_type"], out["content"]) == ("eos", "")
    assert out["tokens_evaluated"] > 10
    assert out["tokens_cached"] == out["tokens_evaluated"] + out["tokens_predicted"]
    assert out["truncated"] is False
    t = out["timings"]
    for k in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms"):
        assert t[k] >= 0, k
    assert t["predicted_n"] == out["tokens_predicted"]
    settings = out["generation_settings"]
    assert settings["samplers"] == ["top_k", "top_p"]  # "infill" is accepted, not applied
    assert settings["top_k"] == 40 and settings["top_p"] == 0.99 and settings["n_indent"] == 4
    # n_indent 4: no line after the first may start less indented than the cursor's line.
    for line in out["content"].split("\n")[1:]:
        if line.strip():
            assert len(line) - len(line.lstrip(" \t")) >= 4, out["content"]


def test_llama_vscode_warmup_returns_at_once(fim):
    t0 = time.perf_counter()
    r = fim.post("/infill", json=vscode_warmup())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["content"] == "" and out["tokens_predicted"] == 0
    assert out["stop"] is True and out["stop_type"] == "limit"
    assert time.perf_counter() - t0 < 10


def test_warmup_fills_the_cache(fim):
    def cached(warm: bool) -> tuple[int, int]:
        prefix = f"# session {uuid.uuid4().hex}\n" + "x = 1\n" * 60 + PREFIX
        if warm:
            fim.post("/infill", json=vscode_warmup(prefix, SUFFIX)).raise_for_status()
        # n_indent 0: a choice a line rule ends cannot report the engine's cache figures.
        body = {**vscode_infill(prefix, SUFFIX, "", 0), "n_predict": 1}
        out = fim.post("/infill", json=body).json()
        return out["timings"]["cache_n"], out["tokens_evaluated"]

    cold, total = cached(warm=False)
    assert cold < total // 2
    warm, total = cached(warm=True)
    assert warm >= total - 2


def test_prompt_goes_after_the_prefix(fim):
    joined = fim.post("/infill", json={**vscode_infill(PREFIX + "ret", SUFFIX, "", 0)}).json()
    split = fim.post("/infill", json={**vscode_infill(PREFIX, SUFFIX, "ret", 0)}).json()
    assert split["tokens_evaluated"] == joined["tokens_evaluated"]
    assert split["prompt"] == joined["prompt"]


def test_llama_vim_warmup_with_response_fields(fim):
    # llama.vim's warm-up: id_slot, temperature 0, response_fields [""].
    body = {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": [{"text": "a = 1\n", "filename": "a.py"}],
        "prompt": "",
        "n_predict": 0,
        "temperature": 0.0,
        "samplers": [],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 1,
        "t_max_predict_ms": 1,
        "response_fields": [""],
    }
    r = fim.post("/infill", json=body)
    assert r.status_code == 200 and r.json() == {}
    picked = fim.post(
        "/infill",
        json={**body, "n_predict": 2, "response_fields": ["content", "timings/predicted_n"]},
    ).json()
    assert set(picked) == {"content", "timings/predicted_n"}


def test_several_candidates(fim):
    body = {**vscode_infill(PREFIX, SUFFIX, "", 0), "n_cmpl": 2, "n_predict": 6, "seed": 7}
    out = fim.post("/infill", json=body).json()
    assert isinstance(out, list) and [o["index"] for o in out] == [0, 1]
    assert all(o["stop"] for o in out)


def test_infill_stream(fim):
    body = {**vscode_infill(PREFIX, SUFFIX, "", 0), "stream": True, "n_predict": 12}
    body["samplers"] = ["top_k"]  # top_k 40 without temperature: sampled; make it greedy
    body["top_k"] = 1
    del body["t_max_predict_ms"]  # a loaded machine could pass 500 ms in one run, not the other
    events = sse_events(fim, "/infill", body)
    assert events[-1]["stop"] is True and "timings" in events[-1]
    assert all(e["stop"] is False for e in events[:-1])
    whole = fim.post("/infill", json={**body, "stream": False}).json()
    assert "".join(e["content"] for e in events) == whole["content"]


def test_infill_on_a_model_without_fim_tokens(client):
    r = client.post("/infill", json=vscode_infill(PREFIX, SUFFIX, "", 0))
    assert_llama_error(r, 400, contains="fill-in-the-middle")
