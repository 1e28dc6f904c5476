"""Prompt-lookup speculation in the default (batched) engine: one stream and eight at once.

    python -m bench.batched_speculation [--rounds 3] [--prompts 6] [--targets Q4_1,F16]
                                        [--kv q8_0] [--draft Q4_0] [--simple] [--json PATH]

Each target (the default model and its F16 rebuild, see bench.speculative.derived_gguf) is
loaded once in codeserve's ``BatchedEngine`` with 8 slots, in this process, and driven through
the engine contract (``submit`` with an event sink), greedy. Modes ``off`` and ``prompt_lookup``
(and ``draft``, with ``--draft``: a build of the default model as the draft model) are interleaved
per prompt and round, so load drifts hit all of them alike.

* one stream: each prompt alone (``rewrite``: code whose answer copies its prompt;
  ``humaneval``: completions from scratch): decode tokens/s and its ratio to ``off``, per round
  over the workload's prompts (median and worst round) and for the worst single pair of
  requests; tokens per target pass and mean K, as ``bench.speculative`` reports them;
* eight streams: eight prompts submitted together (half rewrites, half HumanEval): aggregate
  tokens/s (completion tokens over the wall time of the whole batch) and its ratio to ``off``.

With ``--simple`` the simple engine (``--engine simple``, one request at a time, where #13's 1.5×
was first measured) is loaded beside it and its ``off`` and ``prompt_lookup`` join the one-stream
interleaving, each against its own ``off``: the two engines' gains compare within one run, which
separate runs on this machine cannot (a multi-token F16 step's cost drifts by the hour).

Greedy identity with ``off`` is counted per run (``identical``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.speculative import Prompt, derived_gguf, workloads


@dataclass(frozen=True)
class Variant:
    """A way to serve the one-stream prompts: an engine and a speculation mode."""

    name: str  # the row's mode: "off", "prompt_lookup", "draft", "simple off", ...
    engine: Any
    mode: str
    base: str  # the variant its ratio is taken against: the same engine, speculation off


def _simple_engine(path: Path, kv: str):
    from server.engine.llama import LlamaEngine
    from server.registry import parse_registry

    models: dict = {"t": {"source": {"path": str(path)}, "n_ctx": 2048, "kv_cache": kv}}
    reg = parse_registry({"default_model": "t", "models": models}, Path("bench.toml"))
    return LlamaEngine(path, reg.models["t"])


def _engine(path: Path, kv: str, draft: Path | None = None):
    from server.engine.batched import BatchedEngine
    from server.engine.model import Model
    from server.registry import parse_registry

    models: dict = {"t": {"source": {"path": str(path)}, "n_ctx": 2048, "kv_cache": kv}}
    if draft is not None:
        models["d"] = {"source": {"path": str(draft)}, "n_ctx": 2048, "kv_cache": kv}
        models["t"]["draft"] = "d"
    reg = parse_registry({"default_model": "t", "models": models}, Path("bench.toml"))
    drafter = Model.load(draft, reg.models["d"]) if draft is not None else None
    return BatchedEngine(Model.load(path, reg.models["t"]), slots=8, draft=drafter)


def _submit(engine, prompt: list[int], p: Prompt, mode: str, done: queue.Queue) -> None:
    from server.engine.base import (
        CallbackSink,
        Delta,
        End,
        Finished,
        GenerationRequest,
        SamplingParams,
        Speculation,
    )

    req = GenerationRequest(
        prompt=prompt,
        max_tokens=p.max_tokens,
        sampling=SamplingParams(temperature=0.0),
        stop=p.stop,
        speculation=Speculation(mode=mode),  # type: ignore[arg-type]
    )
    state: dict = {"tokens": [], "timings": None}

    def sink(ev) -> None:
        if isinstance(ev, Delta):
            state["tokens"].extend(ev.token_ids)
        elif isinstance(ev, Finished):
            state["timings"] = ev.timings
        elif isinstance(ev, End):
            if ev.error is not None:
                raise SystemExit(f"generation failed: {ev.error}")
            state["t_end"] = time.perf_counter()
            done.put(state)

    engine.submit(req, CallbackSink(sink))


def _run(engine, batch: list[tuple[list[int], Prompt]], mode: str) -> tuple[list[dict], float]:
    """Submit every request at once; their results and the wall time until the last ended."""
    done: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    for prompt, p in batch:
        _submit(engine, prompt, p, mode, done)
    results = [done.get() for _ in batch]
    return results, max(r["t_end"] for r in results) - t0


def bench_target(
    path: Path, kv: str, rounds: int, n: int, draft: Path | None = None, simple: bool = False
) -> dict:
    engine = _engine(path, kv, draft)
    modes = ["off", "prompt_lookup"] + (["draft"] if draft is not None else [])
    fast = modes[1:]
    variants = [Variant(m, engine, m, "off") for m in modes]
    plain = _simple_engine(path, kv) if simple else None
    if plain is not None:
        variants += [
            Variant(f"simple {m}", plain, m, "simple off") for m in ("off", "prompt_lookup")
        ]
    prompts = workloads(n, lambda s: len(engine.tokenize(s, add_bos=False)))
    ids = [engine.tokenize(p.text, add_bos=True) for p in prompts]
    pairs = list(zip(ids, prompts, strict=True))
    for v in variants:  # warm-up; the first speculative request calibrates
        _run(v.engine, pairs[:1], v.mode)
    rewrites = [x for x in pairs if x[1].workload == "rewrite"]
    others = [x for x in pairs if x[1].workload != "rewrite"]
    eight = (rewrites[:4] + others[:4])[:8]
    flushes = _flushes(engine)
    single: dict[tuple[str, str], list[dict]] = {}
    by_round: dict[tuple[str, str, int], list[dict]] = {}  # (workload, variant, round) -> runs
    # per variant, prompt and round: a request against its plain twin
    pair_ratios: dict[tuple[str, str], list[float]] = {}
    multi: dict[str, list[float]] = {m: [] for m in modes}
    same = {f"single {v.name}": [0, 0] for v in variants if v.name != v.base}
    same.update({f"eight {m}": [0, 0] for m in fast})
    for r in range(rounds):
        for i, pair in enumerate(pairs):
            shift = (r + i) % len(variants)  # the order rotates per prompt and round
            outs = {}
            for v in variants[shift:] + variants[:shift]:
                (res,), _ = _run(v.engine, [pair], v.mode)
                single.setdefault((pair[1].workload, v.name), []).append(res)
                by_round.setdefault((pair[1].workload, v.name, r), []).append(res)
                outs[v.name] = res
            for v in variants:
                if v.name == v.base:
                    continue
                same[f"single {v.name}"][0] += outs[v.base]["tokens"] == outs[v.name]["tokens"]
                same[f"single {v.name}"][1] += 1
                ratio = _decode_tps([outs[v.name]]) / _decode_tps([outs[v.base]])
                pair_ratios.setdefault((pair[1].workload, v.name), []).append(ratio)
        shift = r % len(modes)
        texts = {}
        for mode in modes[shift:] + modes[:shift]:
            # Other prompts take the slots first, so every mode evaluates the eight cold: the
            # one measured second would otherwise find their caches (up to 30% less wall time).
            _run(engine, next(flushes), "off")
            results, wall = _run(engine, eight, mode)
            multi[mode].append(sum(x["timings"].completion_tokens for x in results) / wall)
            texts[mode] = [x["tokens"] for x in results]
        for m in fast:
            for a, b in zip(texts["off"], texts[m], strict=True):
                same[f"eight {m}"][0] += a == b
                same[f"eight {m}"][1] += 1
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    cost = engine._speculation.cost
    engine.close()
    if plain is not None:
        plain.close()
    base_of = {v.name: v.base for v in variants}
    # A round's ratio is over all of a workload's prompts in it (their tokens over their decode
    # time); the worst single pair of requests is noisier (±15% between identical runs here).
    ratios = {
        (w, m): [
            _decode_tps(by_round[(w, m, r)]) / _decode_tps(by_round[(w, base_of[m], r)])
            for r in range(rounds)
        ]
        for w, m in pair_ratios
    }
    compared = {v.name for v in variants if v.name != v.base}
    rows = []
    for (workload, mode), runs in single.items():
        drafted = sum(x["timings"].drafted for x in runs)
        accepted = sum(x["timings"].accepted for x in runs)
        passes = sum(x["timings"].target_passes for x in runs)
        rows.append(
            {
                "streams": 1,
                "workload": workload,
                "mode": mode,
                "tps": _decode_tps(runs),
                "ratio": statistics.median(ratios[workload, mode]) if mode in compared else 1.0,
                "ratio_min": min(ratios[workload, mode]) if mode in compared else 1.0,
                "worst_pair": min(pair_ratios[workload, mode]) if mode in compared else 1.0,
                "acceptance": accepted / drafted if drafted else None,
                # The simple engine's bench (bench.speculative) reports the same two figures.
                "tokens_per_pass": sum(x["timings"].completion_tokens for x in runs) / passes,
                "mean_k": drafted / passes,
            }
        )
    for mode, tps in multi.items():
        base = multi["off"]
        per_round = [t / b for t, b in zip(tps, base, strict=True)]
        rows.append(
            {
                "streams": 8,
                "workload": "4 rewrite + 4 humaneval",
                "mode": mode,
                "tps": statistics.median(tps),
                "ratio": statistics.median(per_round),
                "ratio_min": min(per_round),
                "worst_pair": None,
                "acceptance": None,
                "tokens_per_pass": None,
                "mean_k": None,
            }
        )
    return {
        "target": path.name,
        "kv_cache": kv,
        "cost": cost.describe() if cost else None,
        "identical": {k: f"{a}/{b}" for k, (a, b) in same.items()},
        "rows": rows,
    }


def _flushes(engine) -> Iterator[list[tuple[list[int], Prompt]]]:
    """Batches of eight one-token requests on HumanEval prompts the workloads do not use."""
    from bench.workloads import humaneval

    problems = humaneval()[90:]  # workloads() takes every 11th from the start
    for k in itertools.count():
        batch = [problems[(8 * k + j) % len(problems)].prompt for j in range(8)]
        yield [(engine.tokenize(t, add_bos=True), Prompt("flush", t, 1, ())) for t in batch]


def _decode_tps(runs: list[dict]) -> float:
    tokens = sum(max(x["timings"].completion_tokens - 1, 0) for x in runs)
    seconds = sum(x["timings"].decode_ms for x in runs) / 1e3
    return tokens / seconds if seconds else float("nan")


def markdown(rep: dict) -> str:
    out = []
    for t in rep["targets"]:
        out.append(f"\n### {t['target']} (kv {t['kv_cache']}), batched engine, 8 slots\n")
        out.append(f"- cost model: {t['cost']}")
        out.append(f"- greedy identity with off: {t['identical']}\n")
        out.append(
            "| streams | workload | mode | tok/s | × off (median round) | × off (worst round) "
            "| worst pair | acceptance | tok/pass | mean K |\n"
            "|---|---|---|---|---|---|---|---|---|---|"
        )
        for r in t["rows"]:
            acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
            tpp = f"{r['tokens_per_pass']:.2f}" if r["tokens_per_pass"] else "-"
            k = f"{r['mean_k']:.1f}" if r["mean_k"] is not None else "-"
            pair = f"{r['worst_pair']:.2f}" if r["worst_pair"] is not None else "-"
            out.append(
                f"| {r['streams']} | {r['workload']} | {r['mode']} | {r['tps']:.1f} "
                f"| {r['ratio']:.2f} | {r['ratio_min']:.2f} | {pair} | {acc} | {tpp} | {k} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per workload")
    ap.add_argument("--targets", default="Q4_1,F16", help="the default model's file and builds")
    ap.add_argument("--kv", default="q8_0", choices=["f16", "q8_0", "q4_0"])
    ap.add_argument(
        "--draft", help='also run mode "draft" with this build of the default model as the draft'
    )
    ap.add_argument(
        "--simple",
        action="store_true",
        help="also run the simple engine's off and prompt_lookup in the one-stream rounds",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from bench.harness import target as registry_target

    base = registry_target().path
    rep: dict = {"rounds": args.rounds, "prompts": args.prompts, "targets": []}
    draft = derived_gguf(base, args.draft) if args.draft else None
    for q in (q for q in args.targets.split(",") if q):
        path = derived_gguf(base, q)
        print(f"target {path.name}", file=sys.stderr)
        rep["targets"].append(
            bench_target(path, args.kv, args.rounds, args.prompts, draft, args.simple)
        )
        print(markdown({"targets": rep["targets"][-1:]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rep, indent=2, default=str))


if __name__ == "__main__":
    main()
