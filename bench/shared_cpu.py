"""One stream through HTTP while other processes load the cores: decode speed and first token.

    python -m bench.shared_cpu --url URL [--url URL ...] [--names a,b] [--loads 0,1,2]
                               [--rounds 6] [--tokens 128] [--json PATH]

For each background load (N busy-loop processes at normal priority, ``bench.contention``: a
build, a language server), the servers get the same requests interleaved round by round, their
order alternating: a HumanEval prompt with a fresh first line per round (so nothing answers from a
prompt cache), streamed on ``/v1/completions``, greedy, ``ignore_eos`` so every answer is
``--tokens`` long. Times are taken from the wire on one persistent connection per server
(``bench.client``). Reported per load: median decode tokens/s and time to first token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import client
from bench.contention import busy_load
from bench.harness import SETTLE_S, target, token_counter
from bench.workloads import humaneval, salted_decode_body


def measure(
    urls: dict[str, str],
    model: str,
    loads: list[int],
    rounds: int,
    tokens: int,
    count: Callable[[str], int] | None = None,
) -> dict:
    """``count``: the model's token count of generated text (servers may send several tokens
    to a frame); None counts frames."""
    problems = humaneval()
    names = list(urls)
    rows = []
    for n in loads:
        decode: dict[str, list[float]] = {p: [] for p in names}
        ttft: dict[str, list[float]] = {p: [] for p in names}
        with busy_load(n):
            time.sleep(1.0)
            for r in range(rounds):
                body = salted_decode_body(model, problems[r % len(problems)], tokens)
                for peer in names if r % 2 == 0 else names[::-1]:
                    time.sleep(SETTLE_S)
                    s = client.stream(urls[peer], body, count=count)
                    decode[peer].append(s.decode_tok_s)
                    ttft[peer].append(s.ttft_s * 1e3)
        rows.append(
            {
                "load": n,
                "decode_tok_s": {p: statistics.median(v) for p, v in decode.items()},
                "ttft_ms": {p: statistics.median(v) for p, v in ttft.items()},
                "runs": {"decode_tok_s": decode, "ttft_ms": ttft},
            }
        )
        print(f"  load {n}: done", file=sys.stderr)
    return {"peers": names, "rounds": rounds, "tokens": tokens, "rows": rows}


def markdown(rep: dict) -> str:
    peers = rep["peers"]
    ref = peers[-1]
    out = [
        f"{rep['tokens']} tokens per answer, medians of {rep['rounds']} interleaved rounds; "
        f"ratios to {ref}\n",
        "| busy-loop processes | "
        + " | ".join(f"{p} decode tok/s" for p in peers)
        + " | "
        + " | ".join(f"{p} first token ms" for p in peers)
        + " |",
        "|---:|" + "---:|" * (2 * len(peers)),
    ]
    for row in rep["rows"]:
        d, t = row["decode_tok_s"], row["ttft_ms"]
        cells = [f"{d[p]:.1f}" + (f" ({d[p] / d[ref]:.2f}×)" if p != ref else "") for p in peers]
        cells += [f"{t[p]:.0f}" + (f" ({t[p] / t[ref]:.2f}×)" if p != ref else "") for p in peers]
        out.append(f"| {row['load']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.shared_cpu", description=__doc__)
    client.add_peer_options(ap)
    ap.add_argument("--loads", default="0,1,2", help="busy-loop processes per run")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    urls = client.peers(ap, args)
    loads = [int(x) for x in args.loads.split(",")]
    count = token_counter(target(args.model).path, prompt=False)
    rep = measure(urls, args.model, loads, args.rounds, args.tokens, count)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
    print(markdown(rep))


if __name__ == "__main__":
    main(sys.argv[1:])
