"""`codeserve bench`: codeserve against raw llama.cpp and the servers people run today.

One run, interleaved so drift on a shared machine hits all sides (each one-stream request visits
every peer before the next request, each round of concurrent runs every peer, in rotating order);
medians with min/max; every figure also as a ratio to each baseline.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from tqdm import tqdm

from bench import client, editor_trace, machine, round_robin, workloads
from bench.contention import busy_load
from bench.harness import (
    SETTLE_S,
    Target,
    llama_server_args,
    loaded_libraries,
    percentile,
    server_libraries,
    servers,
    summary,
    token_counter,
)
from bench.raw import RawLlama

PEERS = ("codeserve", "codeserve-simple", "raw", "llama-cpp-python", "llama-server")
# A trivial endpoint per peer, for the client's overhead check.
TRIVIAL = {"llama-cpp-python": "/v1/models"}
# Peers serving llama-server's /completion and /tokenize, which the editor trace sends.
EDITOR_PEERS = ("codeserve", "codeserve-simple", "llama-server")


@dataclass
class Plan:
    rounds: int = 3
    # Concurrent runs are few requests each and move more from one run to the next than the
    # one-stream figures, whose every round has a dozen requests per peer: more rounds.
    concurrency_rounds: int = 6
    autocomplete_tokens: int = 32
    humaneval_problems: int = 6
    humaneval_tokens: int = 128
    prefill_chars: int = 5000
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests_per_stream: int = 2
    concurrency_tokens: int = 128
    candidates: int = 50  # n for "sample many candidates for one problem"
    contention: int = 0  # busy-loop processes running through the whole measurement
    editor_rounds: int = 4  # laps over the editor trace's five files
    editor_file_tokens: int = 1300
    editor_tokens: int = 16
    editor_visits: int | None = None  # only the first N visits (None: every round's)
    editor_trace: bool = True
    round_robin_laps: int = 4  # laps over the short autocomplete/FIM prompts

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            rounds=1,
            concurrency_rounds=1,
            autocomplete_tokens=16,
            humaneval_problems=1,
            humaneval_tokens=32,
            prefill_chars=1500,
            concurrency=(1, 2),
            requests_per_stream=1,
            concurrency_tokens=16,
            candidates=4,
            editor_rounds=2,
            editor_file_tokens=120,
            editor_tokens=1,
            editor_visits=6,  # each file once, then one return
            round_robin_laps=2,
        )

    @classmethod
    def contended(cls, processes: int) -> Plan:
        """The figures a busy machine changes most (one stream's decode and first tokens, 1 and
        8 streams) under `processes` busy loops. The whole suite does not fit: peers with fixed
        threads stall at every barrier a busy core holds, so each workload takes minutes."""
        return cls(
            rounds=2,
            concurrency_rounds=2,
            contention=processes,
            concurrency=(1, 8),
            candidates=0,
            editor_trace=False,
            round_robin_laps=2,
        )


@dataclass
class Results:
    single: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    concurrent: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def add(self, peer: str, figure: str, value: float) -> None:
        self.single.setdefault(peer, {}).setdefault(figure, []).append(value)


def run_suite(
    t: Target,
    peers: list[str],
    plan: Plan,
    llama_server_bin: str | None,
    variants: dict[str, dict] | None = None,
) -> dict:
    http_peers = [p for p in peers if p != "raw"]
    raw = RawLlama(t) if "raw" in peers else None
    res = Results()
    problems = workloads.humaneval()[: plan.humaneval_problems]
    editor_peers = [p for p in http_peers if p in EDITOR_PEERS] if plan.editor_trace else []
    steps = plan.rounds * len(peers) + plan.concurrency_rounds * len(plan.concurrency) * len(
        http_peers
    )
    visits = min(plan.editor_rounds * 5, plan.editor_visits or plan.editor_rounds * 5)
    steps += visits * len(editor_peers) + plan.round_robin_laps * len(http_peers)
    bar = tqdm(total=steps, desc="bench", unit="run", file=sys.stderr)
    with (
        servers(t, http_peers, llama_server_bin, variants) as urls,
        busy_load(plan.contention),
    ):
        overhead = {
            peer: client.check_overhead(url, TRIVIAL.get(peer, "/health"))
            for peer, url in urls.items()
        }
        generated = token_counter(t.path, prompt=False)
        prompt_tokens = token_counter(t.path)
        runs = {
            peer: partial(raw.stream, count=generated)
            if peer == "raw"
            else _http(urls[peer], t.name, generated)
            for peer in peers
        }
        for r in range(plan.rounds):
            bar.set_postfix_str(f"round {r + 1}, one stream")
            for i, (figure, body) in enumerate(_single_stream_requests(plan, problems)):
                # Every request visits every peer before the next one, the order rotating: a
                # minute of drift on a shared machine falls on all of them alike.
                k = (r + i) % len(peers)
                for peer in peers[k:] + peers[:k]:
                    time.sleep(SETTLE_S)
                    _single_stream(runs[peer], peer, figure, body, plan, res, prompt_tokens, r)
            bar.update(len(peers))
        bar.set_postfix_str("editor trace")
        editor = (
            editor_trace.measure(
                {p: urls[p] for p in editor_peers},
                t.name,
                plan.editor_rounds,
                plan.editor_file_tokens,
                plan.editor_tokens,
                step=bar.update,
                visits=plan.editor_visits,
            )
            if editor_peers
            else None
        )
        bar.set_postfix_str("round robin")
        rr = round_robin.measure(
            {p: urls[p] for p in http_peers},
            t.name,
            plan.round_robin_laps,
            plan.autocomplete_tokens,
            step=bar.update,
        )
        generated = token_counter(t.path, prompt=False)
        for r in range(plan.concurrency_rounds):
            for c in plan.concurrency:
                for peer in http_peers[r % len(http_peers) :] + http_peers[: r % len(http_peers)]:
                    bar.set_postfix_str(f"round {r + 1}, {c} streams {peer}")
                    time.sleep(SETTLE_S)  # the last peer's threads may still spin
                    n = c * plan.requests_per_stream
                    bodies = [
                        {
                            "model": t.name,
                            "prompt": prompt,
                            "max_tokens": plan.concurrency_tokens,
                            "temperature": 0,
                        }
                        for prompt in workloads.generation_prompts(n, f"{r}-{c}")
                    ]
                    out = client.concurrent_throughput(urls[peer], bodies, c, n, generated)
                    res.concurrent.setdefault(peer, {}).setdefault(c, []).append(
                        out["tokens_per_s"]
                    )
                    bar.update()
        variant_figures = _variants(urls.get("codeserve"), t, variants or {}, plan)
        candidates = _candidates(urls.get("codeserve"), t.name, plan)
        libraries = {
            peer: loaded_libraries() if peer == "raw" else server_libraries(urls[peer])
            for peer in peers
        }
    bar.close()
    rep = _report(t, peers, plan, res, variant_figures)
    rep["candidates"] = candidates
    rep["editor_trace"] = editor
    rep["round_robin"] = rr
    if "llama-server" in peers:
        rep["llama_server_flags"] = llama_server_args(t)
    rep["client_overhead"] = overhead
    rep["libraries"] = libraries
    return rep


def _http(url: str, model: str, count: Callable[[str], int]):
    def run(body: dict) -> client.Sample:
        return client.stream(url, {"model": model, **body}, count=count)

    return run


def _single_stream_requests(plan: Plan, problems) -> list[tuple[str, dict | None]]:
    """A round of one-stream requests, each with the figure it gives: short autocomplete and
    FIM prompts (first token), HumanEval prompts (decode), and a long prompt (prefill; None:
    salted per peer when sent, so no server has it cached)."""
    out: list[tuple[str, dict | None]] = [
        (
            "ttft_ms",
            {
                "prompt": prompt,
                "max_tokens": plan.autocomplete_tokens,
                "temperature": 0,
                "stop": workloads.STOPS,
            },
        )
        for prompt in workloads.AUTOCOMPLETE + workloads.FIM_EDITS
    ]
    out += [
        (
            "decode_tok_s",
            {"prompt": p.prompt, "max_tokens": plan.humaneval_tokens, "temperature": 0},
        )
        for p in problems
    ]
    out.append(("prefill_tok_s", None))
    return out


def _single_stream(
    run, peer: str, figure: str, body: dict | None, plan: Plan, res: Results, count, r: int
) -> None:
    if body is None:
        prompt = workloads.long_prompt(plan.prefill_chars, f"{peer}-{r}-{time.time_ns()}")
        s = run({"prompt": prompt, "max_tokens": 1, "temperature": 0})
        res.add(peer, figure, count(prompt) / s.ttft_s)
        return
    s = run(body)
    if figure == "ttft_ms":
        res.add(peer, figure, s.ttft_s * 1e3)
        res.latencies.setdefault(peer, []).append(s.latency_s)
    else:
        res.add(peer, figure, s.decode_tok_s)


def _candidates(url: str | None, model: str, plan: Plan) -> dict:
    """n candidates for one HumanEval prompt: one request with n vs n sequential requests."""
    if url is None or plan.candidates == 0:
        return {}
    body = {
        "model": model,
        "prompt": workloads.humaneval()[0].prompt,
        "max_tokens": 64,
        "temperature": 0.8,
    }
    t0 = time.perf_counter()
    client.post(url, "/v1/completions", {**body, "n": plan.candidates}, timeout=1800)
    together = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(plan.candidates):
        client.post(url, "/v1/completions", {**body, "seed": i})
    sequential = time.perf_counter() - t0
    return {
        "n": plan.candidates,
        "one_request_s": together,
        "sequential_s": sequential,
        "speedup": sequential / together,
    }


def _variants(url: str | None, t: Target, variants: dict[str, dict], plan: Plan) -> dict[str, dict]:
    """Decode speed per codeserve variant (quant rung, KV cache type, speculation), next to the
    model as configured, on HumanEval completions and on code rewrites (which copy their prompt).
    """
    out: dict[str, dict] = {}
    if url is None or not variants:
        return out
    problems = workloads.humaneval()[: max(1, plan.humaneval_problems // 2)]
    count = token_counter(t.path)
    generated = token_counter(t.path, prompt=False)
    rewrites = workloads.rewrite_prompts(max(1, plan.humaneval_problems // 2), count)
    bodies = {
        "decode_tok_s": [
            {"prompt": p.prompt, "max_tokens": plan.humaneval_tokens} for p in problems
        ],
        "rewrite_decode_tok_s": [
            {"prompt": text, "max_tokens": n, "stop": list(workloads.REWRITE_STOPS)}
            for text, n in rewrites
        ],
    }
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in {t.name: {}, **variants}}
    for _ in range(plan.rounds):  # interleaved, like the peers
        for name in runs:
            for figure, batch in bodies.items():
                for body in batch:
                    s = client.stream(
                        url, {"model": name, "temperature": 0, **body}, count=generated
                    )
                    runs[name].setdefault(figure, []).append(s.decode_tok_s)
    for name, figs in runs.items():
        out[name] = {k: summary(v) for k, v in figs.items()} | variants.get(name, {})
    return out


def _paired(ours: dict[str, list[float]], theirs: dict[str, list[float]]) -> dict[str, float]:
    """Per figure, the median of codeserve's value over the peer's, request by request (one
    stream) or round by round (concurrent runs): each pair ran within seconds, so the machine's
    drift cancels in it."""
    out = {}
    for k, xs in ours.items():
        ys = theirs.get(k, [])
        if len(ys) != len(xs):  # not the same requests
            continue
        pairs = [a / b for a, b in zip(xs, ys, strict=True) if a == a and b == b]
        if pairs:
            out[f"{k} (paired)"] = statistics.median(pairs)
    return out


def _report(t: Target, peers: list[str], plan: Plan, res: Results, variants: dict) -> dict:
    figures = {peer: {k: summary(v) for k, v in figs.items()} for peer, figs in res.single.items()}
    for peer, lat in res.latencies.items():
        figures[peer]["latency_p50_ms"] = summary([percentile(lat, 0.5) * 1e3])
        figures[peer]["latency_p95_ms"] = summary([percentile(lat, 0.95) * 1e3])
    concurrent = {
        peer: {str(c): summary(v) for c, v in by_c.items()} for peer, by_c in res.concurrent.items()
    }
    bandwidth = machine.memory_bandwidth_gbs()
    size = t.path.stat().st_size
    limit = bandwidth * 1e9 / size
    ours = figures.get("codeserve", {}).get("decode_tok_s", {}).get("median", float("nan"))
    ratios = _ratios(peers, res, figures, concurrent)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine.describe(),
        "model": {
            "name": t.name,
            "file": t.path.name,
            "bytes": size,
            "n_ctx": t.n_ctx,
            "threads": t.threads,
            "kv_cache": t.kv_cache,
        },
        "plan": plan.__dict__,
        "peers": peers,
        "single_stream": figures,
        "aggregate_tok_s": concurrent,
        "ratios_codeserve_over": ratios,
        "variants": variants,
        "physical_limit": {
            "memory_bandwidth_gbs": bandwidth,
            "bytes_per_token": size,
            "decode_tok_s_limit": limit,
            "codeserve_fraction": ours / limit,
        },
    }


def _ratios(peers: list[str], res: Results, figures: dict, concurrent: dict) -> dict:
    """codeserve over each other peer: the ratio of medians of every figure, and paired."""
    ratios: dict[str, dict[str, float]] = {}
    for base in (p for p in peers if p != "codeserve"):
        ratios[base] = {
            k: figures["codeserve"][k]["median"] / v["median"]
            for k, v in figures.get(base, {}).items()
            if k in figures["codeserve"]
        }
        ratios[base].update(_paired(res.single.get("codeserve", {}), res.single.get(base, {})))
        for c, v in concurrent.get(base, {}).items():
            ratios[base][f"aggregate_tok_s@{c}"] = (
                concurrent["codeserve"][c]["median"] / v["median"]
            )
        ratios[base].update(
            _paired(
                {f"aggregate_tok_s@{c}": v for c, v in res.concurrent.get("codeserve", {}).items()},
                {f"aggregate_tok_s@{c}": v for c, v in res.concurrent.get(base, {}).items()},
            )
        )
    return ratios
