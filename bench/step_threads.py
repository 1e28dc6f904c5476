"""The batched engine's decode steps with each thread count while other processes load the cores,
and what ``server.engine.cpu_share`` reads of that load.

    python -m bench.step_threads [--loads 0,0.25,0.5,0.75,1] [--sizes 1,8,32,128] [--rounds 3]

One multi-sequence context of the default model (the engine's ``BatchContext``: q8_0 KV, flash
attention, eight sequences holding a 60-token prompt each) steps n tokens at a time (one per
sequence, round robin), switched between 1 and 2 threads, interleaved round by round, under each
background load (``bench.threads.load``). llama.cpp uses its batch thread count for every step
over one token, so a step of eight streams counts as a batch there; this measures where such steps
part from one-token steps and from prompt batches. The reading column is ``CpuShare.others`` while
stepping with each count: other processes' load as it looks beside our threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.threads import load

_SEQS, _PROMPT, _STEPS = 8, 60, 6


def measure(loads: list[float], sizes: list[int], rounds: int) -> dict:
    from bench.harness import engine_context, target
    from server.engine.cpu_share import CpuShare
    from server.engine.model import Model
    from server.registry import load_registry
    from server.settings import StoreSettings

    t = target()
    cfg = load_registry(StoreSettings().models_file).models[t.name]
    model = Model.load(t.path, cfg)
    ctx = engine_context(model, n_seq=_SEQS)
    for s in range(_SEQS):
        ctx.decode([(100 + s + i, i, s, i == _PROMPT - 1) for i in range(_PROMPT)])
    share = CpuShare(2)
    pos = [_PROMPT] * _SEQS

    def step(n: int) -> float:
        share.threads()  # reads /proc every 0.25 s, as in the engine
        entries = [(200, pos[i % _SEQS] + i // _SEQS, i % _SEQS, True) for i in range(n)]
        t0 = time.perf_counter()
        ctx.decode(entries)
        seconds = time.perf_counter() - t0
        for i in range(n):
            pos[i % _SEQS] += 1
        return seconds

    rows = []
    try:
        for cores in loads:
            times: dict[tuple[int, int], list[float]] = {}
            reads: dict[int, list[float]] = {1: [], 2: []}
            with load(cores):
                share.rest()
                for r in range(rounds):
                    for threads in (1, 2) if r % 2 == 0 else (2, 1):
                        ctx.set_threads((threads, threads))
                        for n in sizes:
                            for _ in range(_STEPS):
                                times.setdefault((threads, n), []).append(step(n))
                                if share.others is not None:
                                    reads[threads].append(share.others)
                    for s in range(_SEQS):  # positions stay near the prompt
                        ctx.seq_rm(s, _PROMPT, -1)
                        pos[s] = _PROMPT
            row: dict = {"load": cores}
            for threads in (1, 2):
                row[f"reading_t{threads}"] = statistics.median(reads[threads] or [0.0])
                for n in sizes:
                    row[f"tok_s_t{threads}_n{n}"] = n / statistics.median(times[(threads, n)])
            rows.append(row)
            print(f"  load {cores}: done", file=sys.stderr)
    finally:
        ctx.close()
        model.close()
    return {"model": t.path.name, "rounds": rounds, "sizes": sizes, "rows": rows}


def markdown(rep: dict) -> str:
    sizes = rep["sizes"]
    head = " | ".join(f"{n} tok: 1 / 2 thr" for n in sizes)
    out = [
        f"{rep['model']}, tokens/s per step size, medians of {rep['rounds']} interleaved rounds\n",
        f"| load (cores) | reading at 1 / 2 thr | {head} |",
        "|---:|---:|" + "---:|" * len(sizes),
    ]
    for row in rep["rows"]:
        cells = [f"{row[f'tok_s_t1_n{n}']:.0f} / {row[f'tok_s_t2_n{n}']:.0f}" for n in sizes]
        reading = f"{row['reading_t1']:.2f} / {row['reading_t2']:.2f}"
        out.append(f"| {row['load']:g} | {reading} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.step_threads", description=__doc__)
    ap.add_argument("--loads", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--sizes", default="1,8,32,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rep = measure(
        [float(x) for x in args.loads.split(",")],
        [int(x) for x in args.sizes.split(",")],
        args.rounds,
    )
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
    print(markdown(rep))


if __name__ == "__main__":
    main()
