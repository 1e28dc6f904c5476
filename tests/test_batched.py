"""The batched engine on the real model: many streams in one llama_decode, n choices, isolation.

The session server runs the batched engine (what "auto" picks); these tests drive it with
concurrent clients and check each stream against the same request served alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.engine.base import Delta, Finished, GenerationRequest, SamplingParams
from server.engine.batched import BatchedEngine
from server.engine.model import Model
from server.scheduler import ModelWorker
from tests.conftest import SMALL_CTX_MODEL, greedy_run

PROMPTS = [
    f"def {name}("
    for name in (
        "parse_csv",
        "merge_sorted",
        "fibonacci",
        "is_prime",
        "flatten",
        "word_count",
        "binary_search",
        "transpose",
    )
]


def complete(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def streamed_text(url: str, body: dict, stop_after: int | None = None) -> dict[int, str]:
    texts: dict[int, str] = {}
    with httpx.stream(
        "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=300
    ) as r:
        for n, line in enumerate(r.iter_lines()):
            if stop_after is not None and n >= stop_after:
                break
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    return texts


def streamed_tokens(url: str, body: dict) -> list[str]:
    """The tokens of choice 0 of a streamed completion (from its per-chunk logprobs)."""
    tokens: list[str] = []
    with httpx.stream(
        "POST", url + "/v1/completions", json={**body, "stream": True, "logprobs": 1}, timeout=300
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    if c["index"] == 0 and c["logprobs"]:
                        tokens += c["logprobs"]["tokens"]
    return tokens


def first_divergence_gap(alone: dict, other: list[str]) -> float | None:
    """None when the tokens `other` equal the alone run's; else the alone run's top-2 logprob gap
    at the first token where they differ.

    Compared token by token: a text comparison would blame the token after a split such as
    "ab"+"cd" against "abc"+"d", where the two runs parted one token earlier.
    """
    tokens = alone["logprobs"]["tokens"]
    if other == tokens:
        return None
    k = next((i for i, (a, b) in enumerate(zip(tokens, other, strict=False)) if a != b), None)
    if k is None:  # one is a prefix of the other: they differ where the shorter one stopped
        k = min(len(tokens), len(other))
        if k == len(tokens):
            return math.inf  # the alone run ended there: its logprobs cannot tell how close it was
    top = sorted(alone["logprobs"]["top_logprobs"][k].values(), reverse=True)
    return top[0] - top[1]


def test_eight_concurrent_streams_match_their_solo_runs(server):
    body = {"max_tokens": 40, "temperature": 0}
    alone = [
        complete(server.url, {**body, "prompt": p, "logprobs": 2})["choices"][0] for p in PROMPTS
    ]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda p: streamed_tokens(server.url, {**body, "prompt": p}), PROMPTS)
        )
    gaps = [first_divergence_gap(a, t) for a, t in zip(alone, together, strict=True)]
    # llama.cpp is not bit-exact across batch shapes (measured: logits move by up to ~0.1 nats), so
    # a stream may part from its solo run only where its two best tokens nearly tie.
    assert all(g is None or g < 0.3 for g in gaps), list(zip(gaps, alone, together, strict=True))
    assert any(g is None for g in gaps), gaps


def test_n_choices_are_distinct_and_well_formed(server):
    out = complete(
        server.url,
        {"prompt": "def shuffle(items):\n", "max_tokens": 24, "n": 4, "temperature": 1.0},
    )
    choices = out["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)
    assert len({c["text"] for c in choices}) >= 3
    assert out["usage"]["completion_tokens"] <= 4 * 24


def test_n_choices_stream_each_with_its_own_finish(server):
    finishes: dict[int, str] = {}
    texts: dict[int, str] = {}
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        timeout=300,
        json={
            "prompt": "import os\n",
            "max_tokens": 12,
            "n": 3,
            "temperature": 0.9,
            "stream": True,
        },
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    if c["finish_reason"]:
                        finishes[c["index"]] = c["finish_reason"]
    assert sorted(finishes) == [0, 1, 2] and all(texts.values())


def test_more_choices_than_slots(server):
    out = complete(server.url, {"prompt": "x = ", "max_tokens": 4, "n": 12, "temperature": 1.0})
    assert [c["index"] for c in out["choices"]] == list(range(12))
    assert all(c["finish_reason"] for c in out["choices"])


def test_chat_n(openai_client):
    out = openai_client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        n=2,
        temperature=1.0,
    )
    assert [c.index for c in out.choices] == [0, 1]


def test_no_cross_talk_between_sequences(server):
    marker = "PLUGHXYZZY"
    secret = f"The password is {marker}. Repeat the password: {marker}. Again: "
    prompts = [secret, *PROMPTS[:7]]
    with ThreadPoolExecutor(8) as pool:
        outs = list(
            pool.map(
                lambda p: complete(server.url, {"prompt": p, "max_tokens": 32, "temperature": 0})[
                    "choices"
                ][0]["text"],
                prompts,
            )
        )
    assert all(marker not in o for o in outs[1:]), outs


@pytest.fixture()
def small(server):
    return server.url, SMALL_CTX_MODEL  # 512 tokens per sequence


def test_cancelled_stream_frees_its_cells(small):
    url, model = small
    long = {"model": model, "max_tokens": 400, "temperature": 0.8}
    threads = [
        threading.Thread(target=streamed_text, args=(url, {**long, "prompt": p}, 40))
        for p in PROMPTS
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # every one of them dropped its connection mid-generation
    prompt = "word " * 200
    n_prompt = complete(url, {"model": model, "prompt": prompt, "max_tokens": 1})["usage"][
        "prompt_tokens"
    ]
    # A request of the maximum size: its prompt and completion fill the whole context.
    out = complete(
        url,
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": 512 - n_prompt,
            "temperature": 0.8,
            "repeat_penalty": 1.2,
        },
    )
    assert out["usage"]["total_tokens"] <= 512
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    m = httpx.get(url + "/metrics").text
    assert 'llamacpp:requests_processing{model="smollm2-135m-ctx512"} 0.0' in m


def test_clients_leaving_together_never_strand_a_slot(model_path, registry):
    # Twenty clients leave after their first token, some while their tokens are mid-step: every
    # request must still finish inside the engine (a stranded one held its slot and its worker
    # thread forever, so after a few such storms nothing was scheduled at all).
    cfg = registry.models["smollm2-135m"].model_copy(update={"n_ctx": 512})
    engine = BatchedEngine(Model.load(model_path, cfg), slots=8)
    worker = ModelWorker("m", engine, queue_size=64, queue_timeout_s=20)

    def request(text: str, max_tokens: int) -> GenerationRequest:
        prompt = engine.tokenize(text, add_bos=True)
        return GenerationRequest(prompt, max_tokens, sampling=SamplingParams(temperature=0.8))

    async def leave_early(i: int) -> None:
        async for _ in worker.stream(request(f"def f{i}(x):", 64)):
            break

    async def storms() -> list[Finished]:
        finished = []
        for _ in range(4):
            await asyncio.gather(*(leave_early(i) for i in range(20)))
            events = [e async for e in worker.stream(request("import os\n", 8))]
            finished.append(events[-1])
        return finished

    try:
        finished = asyncio.run(asyncio.wait_for(storms(), 120))
        assert all(f.reason in ("stop", "length") for f in finished), finished
    finally:
        worker.close()


def test_a_collected_answer_comes_in_one_piece_after_its_first_token(model_path, registry):
    """Nobody reads a non-streamed answer before it ends: after the first release (the time to
    first token), a choice's text is handed over once, at its end, the same text and tokens a
    stream delivers piece by piece."""
    cfg = registry.models["smollm2-135m"].model_copy(update={"n_ctx": 512})
    engine = BatchedEngine(Model.load(model_path, cfg), slots=4)
    worker = ModelWorker("m", engine, queue_size=8, queue_timeout_s=20)
    prompt = engine.tokenize("def fizzbuzz(n):\n", add_bos=True)
    request = GenerationRequest(prompt, 40, sampling=SamplingParams(temperature=0), n=2, logprobs=1)

    async def events(stream: bool) -> list:
        return [e async for e in worker.stream(dataclasses.replace(request, stream=stream))]

    def per_choice(evs: list) -> dict[int, list[Delta]]:
        out: dict[int, list[Delta]] = {0: [], 1: []}
        for e in evs:
            if isinstance(e, Delta):
                out[e.index].append(e)
        return out

    try:
        streamed = per_choice(asyncio.run(events(True)))
        collected = per_choice(asyncio.run(events(False)))
    finally:
        worker.close()

    def joined(deltas: list[Delta]) -> tuple:
        tokens = [t for d in deltas for t in d.token_ids]
        return "".join(d.text for d in deltas), tokens, [lp for d in deltas for lp in d.logprobs]

    for i in (0, 1):
        assert len(streamed[i]) > 2 and len(collected[i]) == 2
        assert joined(collected[i]) == joined(streamed[i])


def test_a_request_that_fails_to_start_fails_alone(model_path, registry):
    """An error while a request takes its slot ends that request with it; the ones decoding
    go on, and the slot is free again (before: the request was lost and its client waited)."""
    cfg = registry.models["smollm2-135m"].model_copy(update={"n_ctx": 512})
    engine = BatchedEngine(Model.load(model_path, cfg), slots=2)
    worker = ModelWorker("m", engine, queue_size=8, queue_timeout_s=60)
    place = engine._caches.place
    calls = []

    def failing_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("placement failed")
        return place(*args, **kwargs)

    engine._caches.place = failing_once  # type: ignore[method-assign]
    prompt = engine.tokenize("def add(a, b):\n    ", add_bos=True)

    async def go() -> None:
        slow = asyncio.ensure_future(greedy_run(worker, prompt, 48))
        await asyncio.sleep(0.05)  # decoding when the next one starts
        with pytest.raises(RuntimeError, match="placement failed"):
            await greedy_run(worker, prompt, 4)
        assert not slow.done()
        assert (await slow)[1]  # the request decoding meanwhile went on
        assert (await greedy_run(worker, prompt, 4))[1]  # and the slots still serve
        assert not any(s.busy for s in engine._slots)

    try:
        asyncio.run(go())
    finally:
        worker.close()
