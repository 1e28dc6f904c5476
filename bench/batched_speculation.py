"""Prompt-lookup speculation in the default (batched) engine: one stream and eight at once.

    python -m bench.batched_speculation [--rounds 3] [--prompts 6] [--targets Q4_1,F16]
                                        [--kv q8_0] [--json PATH]

Each target (the default model and its F16 rebuild, see bench.speculative.derived_gguf) is
loaded once in codeserve's ``BatchedEngine`` with 8 slots, in this process, and driven through
the engine contract (``submit`` with an event sink), greedy. Modes ``off`` and ``lookup`` are
interleaved per prompt and round, so load drifts hit both alike.

* one stream: each prompt alone (``rewrite``: code whose answer copies its prompt;
  ``humaneval``: completions from scratch): decode tokens/s and its ratio to ``off``;
* eight streams: eight prompts submitted together (half rewrites, half HumanEval): aggregate
  tokens/s (completion tokens over the wall time of the whole batch) and its ratio to ``off``.

Greedy identity with ``off`` is counted per run (``identical``).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import time
from pathlib import Path

from bench.speculative import Prompt, derived_gguf, workloads


def _engine(path: Path, kv: str):
    from server.engine.batched import BatchedEngine
    from server.engine.model import Model
    from server.registry import parse_registry

    models = {"t": {"source": {"path": str(path)}, "n_ctx": 2048, "kv_cache": kv}}
    reg = parse_registry({"default_model": "t", "models": models}, Path("bench.toml"))
    return BatchedEngine(Model.load(path, reg.models["t"]), slots=8)


def _submit(engine, prompt: list[int], p: Prompt, mode: str, done: queue.Queue) -> None:
    from server.engine.base import (
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

    engine.submit(req, sink)


def _run(engine, batch: list[tuple[list[int], Prompt]], mode: str) -> tuple[list[dict], float]:
    """Submit every request at once; their results and the wall time until the last ended."""
    done: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    for prompt, p in batch:
        _submit(engine, prompt, p, mode, done)
    results = [done.get() for _ in batch]
    return results, max(r["t_end"] for r in results) - t0


def bench_target(path: Path, kv: str, rounds: int, n: int) -> dict:
    engine = _engine(path, kv)
    prompts = workloads(n, lambda s: len(engine.tokenize(s, add_bos=False)))
    ids = [engine.tokenize(p.text, add_bos=True) for p in prompts]
    pairs = list(zip(ids, prompts, strict=True))
    for mode in ("off", "prompt_lookup"):  # warm-up; the first speculative request calibrates
        _run(engine, pairs[:1], mode)
    rewrites = [x for x in pairs if x[1].workload == "rewrite"]
    others = [x for x in pairs if x[1].workload != "rewrite"]
    eight = (rewrites[:4] + others[:4])[:8]
    single: dict[tuple[str, str], list[dict]] = {}
    ratios: dict[str, list[float]] = {}
    multi: dict[str, list[float]] = {"off": [], "prompt_lookup": []}
    same = {"single": [0, 0], "eight": [0, 0]}
    for r in range(rounds):
        for i, pair in enumerate(pairs):
            order = ("off", "prompt_lookup") if (r + i) % 2 == 0 else ("prompt_lookup", "off")
            outs = {}
            for mode in order:
                (res,), _ = _run(engine, [pair], mode)
                single.setdefault((pair[1].workload, mode), []).append(res)
                outs[mode] = res
            same["single"][0] += outs["off"]["tokens"] == outs["prompt_lookup"]["tokens"]
            same["single"][1] += 1
            tps = {m: _decode_tps([o]) for m, o in outs.items()}
            ratios.setdefault(pair[1].workload, []).append(tps["prompt_lookup"] / tps["off"])
        order = ("off", "prompt_lookup") if r % 2 == 0 else ("prompt_lookup", "off")
        texts = {}
        for mode in order:
            results, wall = _run(engine, eight, mode)
            multi[mode].append(sum(x["timings"].completion_tokens for x in results) / wall)
            texts[mode] = [x["tokens"] for x in results]
        for a, b in zip(texts["off"], texts["prompt_lookup"], strict=True):
            same["eight"][0] += a == b
            same["eight"][1] += 1
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    cost = engine._speculation.cost
    engine.close()
    rows = []
    for (workload, mode), runs in single.items():
        drafted = sum(x["timings"].drafted for x in runs)
        accepted = sum(x["timings"].accepted for x in runs)
        rows.append(
            {
                "streams": 1,
                "workload": workload,
                "mode": mode,
                "tps": _decode_tps(runs),
                "ratio": statistics.median(ratios[workload]) if mode != "off" else 1.0,
                "ratio_min": min(ratios[workload]) if mode != "off" else 1.0,
                "acceptance": accepted / drafted if drafted else None,
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
                "acceptance": None,
            }
        )
    return {
        "target": path.name,
        "kv_cache": kv,
        "cost": cost.describe() if cost else None,
        "identical": {k: f"{a}/{b}" for k, (a, b) in same.items()},
        "rows": rows,
    }


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
            "| streams | workload | mode | tok/s | × off (median) | × off (worst round) "
            "| acceptance |\n|---|---|---|---|---|---|---|"
        )
        for r in t["rows"]:
            acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
            out.append(
                f"| {r['streams']} | {r['workload']} | {r['mode']} | {r['tps']:.1f} "
                f"| {r['ratio']:.2f} | {r['ratio_min']:.2f} | {acc} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per workload")
    ap.add_argument("--targets", default="Q4_1,F16", help="the default model's file and builds")
    ap.add_argument("--kv", default="q8_0", choices=["f16", "q8_0", "q4_0"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from bench.harness import target as registry_target

    base = registry_target().path
    rep: dict = {"rounds": args.rounds, "prompts": args.prompts, "targets": []}
    for q in (q for q in args.targets.split(",") if q):
        path = derived_gguf(base, q)
        print(f"target {path.name}", file=sys.stderr)
        rep["targets"].append(bench_target(path, args.kv, args.rounds, args.prompts))
        print(markdown({"targets": rep["targets"][-1:]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rep, indent=2, default=str))


if __name__ == "__main__":
    main()
