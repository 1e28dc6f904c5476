"""llama.cpp's speed with each thread count while other processes load the cores.

    python -m bench.threads [--loads 0,0.25,0.5,0.75,1,2] [--rounds 4] [--json PATH]

One context of the default model (llama-cpp-python's ``Llama`` in this process, flash attention)
is switched between thread counts at run time (``llama_set_n_threads``), interleaved round by
round, under each background load: whole busy-loop processes (``bench.contention``) plus one that
is busy for the rest's fraction of every 10 ms. Reported per load and thread
count: greedy decode tokens/s (48 tokens after a short prompt) and prompt evaluation tokens/s (256
tokens in one batch). ``server.engine.cpu_share`` takes its thresholds from this table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.contention import busy_load

# Busy for `duty` of every 10 ms: a load of a fraction of one core.
_PARTIAL = """
import sys, time
duty = float(sys.argv[1])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.01 * duty:
        pass
    time.sleep(0.01 * (1 - duty))
"""


@contextmanager
def load(cores: float) -> Iterator[None]:
    whole, part = int(cores), cores - int(cores)
    partial = [subprocess.Popen([sys.executable, "-c", _PARTIAL, str(part)])] if part else []
    try:
        with busy_load(whole):
            time.sleep(0.5)
            yield
    finally:
        for p in partial:
            p.kill()
            p.wait()


def measure(loads: list[float], rounds: int, counts: list[int]) -> dict:
    import llama_cpp

    from bench.harness import target

    path = target().path
    top = max(counts)
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=2048,
        n_batch=512,
        n_threads=top,
        n_threads_batch=top,
        flash_attn=True,
        verbose=False,
    )
    short = llm.tokenize(b"def parse_config(path):\n")
    long = llm.tokenize(b"def f(x):\n    return x + 1\n" * 40)[:256]

    def decode() -> float:
        llm.reset()
        llm.eval(short)
        t0 = time.perf_counter()
        for _ in range(48):
            llm.eval([llm.sample(temp=0)])
        return 48 / (time.perf_counter() - t0)

    def prefill() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long)
        return len(long) / (time.perf_counter() - t0)

    rows = []
    for cores in loads:
        runs: dict[tuple[str, int], list[float]] = {}
        with load(cores):
            for r in range(rounds):
                for n in counts if r % 2 == 0 else counts[::-1]:
                    llama_cpp.llama_set_n_threads(llm.ctx, n, n)
                    runs.setdefault(("decode", n), []).append(decode())
                    runs.setdefault(("prefill", n), []).append(prefill())
        row = {"load": cores}
        for (kind, n), values in runs.items():
            row[f"{kind}_t{n}"] = statistics.median(values)
        rows.append(row)
        print(f"  load {cores}: done", file=sys.stderr)
    return {"model": path.name, "rounds": rounds, "threads": counts, "rows": rows}


def markdown(rep: dict) -> str:
    counts = rep["threads"]
    head = " | ".join(f"decode, {n} thr" for n in counts)
    head += " | " + " | ".join(f"prompt, {n} thr" for n in counts)
    out = [
        f"{rep['model']}, medians of {rep['rounds']} interleaved rounds, tokens/s\n",
        f"| other processes keep busy (cores) | {head} |",
        "|---:|" + "---:|" * (2 * len(counts)),
    ]
    for row in rep["rows"]:
        cells = [f"{row[f'decode_t{n}']:.1f}" for n in counts]
        cells += [f"{row[f'prefill_t{n}']:.1f}" for n in counts]
        out.append(f"| {row['load']:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__)
    ap.add_argument("--loads", default="0,0.25,0.5,0.75,1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", default="1,2", help="thread counts to compare")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rep = measure(
        [float(x) for x in args.loads.split(",")],
        args.rounds,
        [int(x) for x in args.threads.split(",")],
    )
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
    print(markdown(rep))


if __name__ == "__main__":
    main(sys.argv[1:])
