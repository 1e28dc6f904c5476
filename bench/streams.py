"""Aggregate tokens/s of concurrent clients, the suite's workload, against servers already running.

    python -m bench.streams --url URL [--url URL ...] [--names a,b] [--streams 1,8]
                            [--rounds 4] [--tokens 128] [--prompt-chars N] [--gguf PATH]
                            [--json PATH]

What ``codeserve bench`` measures as "aggregate tokens/s at N streams" (N clients, 2N salted
short prompts, greedy, non-streamed ``/v1/completions``), for servers someone else started: two
builds of codeserve side by side, or one with a setting changed, next to llama-server. Servers
take turns round by round, the order rotating, so a noisy machine slows them alike. With
``--gguf`` (the model's file) the answers' text is counted with its vocabulary, the same for every
server, instead of trusting each server's ``completion_tokens``. With ``--prompt-chars N`` the
prompts are N characters of real source each, a different stretch for every request (nothing a
cache could reuse), and every answer is ``--tokens`` long: a batch job over files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import client, workloads
from bench.harness import SETTLE_S, token_counter


def measure(
    urls: dict[str, str],
    model: str,
    streams: list[int],
    rounds: int,
    tokens: int,
    count: Callable[[str], int] | None = None,
    prompt_chars: int = 0,
) -> dict:
    names = list(urls)
    runs: dict[int, dict[str, list[float]]] = {c: {p: [] for p in names} for c in streams}
    made = 0  # requests of the run so far: each long prompt is the next stretch of source
    for r in range(rounds):
        for c in streams:
            k = r % len(names)
            n = 2 * c
            bodies = _bodies(model, n, f"{r}-{c}", made, tokens, prompt_chars)
            made += n
            for peer in names[k:] + names[:k]:
                time.sleep(SETTLE_S)
                out = client.concurrent_throughput(urls[peer], bodies, c, n, count)
                runs[c][peer].append(out["tokens_per_s"])
        print(f"  round {r + 1}: done", file=sys.stderr)
    rows = [
        {
            "streams": c,
            "tokens_per_s": {p: statistics.median(v) for p, v in runs[c].items()},
            "runs": runs[c],
        }
        for c in streams
    ]
    return {
        "peers": names,
        "rounds": rounds,
        "tokens": tokens,
        "prompt_chars": prompt_chars,
        "rows": rows,
    }


def _bodies(
    model: str, n: int, salt: str, first: int, tokens: int, prompt_chars: int
) -> list[dict]:
    """``n`` requests: the suite's short prompts, or with ``prompt_chars`` long ones, the run's
    requests ``first``... each the next stretch of source (they repeat only once this repository's
    server code, ~560,000 characters, runs out), the answer's length fixed: a batch job over files.
    """
    if not prompt_chars:
        return [
            {"model": model, "prompt": p, "max_tokens": tokens, "temperature": 0}
            for p in workloads.generation_prompts(n, salt)
        ]
    return [
        {
            "model": model,
            "prompt": workloads.long_prompt(
                prompt_chars, f"{salt}-{i}", offset=(first + i) * prompt_chars
            ),
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        for i in range(n)
    ]


def markdown(rep: dict) -> str:
    peers = rep["peers"]
    ref = peers[-1]
    out = [
        f"Aggregate tokens/s, up to {rep['tokens']} greedy tokens per answer, medians of "
        f"{rep['rounds']} interleaved rounds (min–max); ratios to {ref}\n",
        "| streams | " + " | ".join(peers) + " |",
        "|---:|" + "---:|" * len(peers),
    ]
    for row in rep["rows"]:
        med, runs = row["tokens_per_s"], row["runs"]
        cells = [
            f"{med[p]:.1f} ({min(runs[p]):.1f}–{max(runs[p]):.1f})"
            + (f" {med[p] / med[ref]:.2f}×" if p != ref else "")
            for p in peers
        ]
        out.append(f"| {row['streams']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    client.add_peer_options(ap)
    ap.add_argument("--streams", default="1,8", help="concurrent clients per run")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument(
        "--prompt-chars",
        type=int,
        default=0,
        metavar="N",
        help="long prompts of N characters of source, 2x streams of them, instead of short ones",
    )
    ap.add_argument("--gguf", type=Path, help="count answers' tokens with this vocabulary")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    urls = client.peers(ap, args)
    streams = [int(x) for x in args.streams.split(",")]
    count = token_counter(args.gguf, prompt=False) if args.gguf else None
    rep = measure(urls, args.model, streams, args.rounds, args.tokens, count, args.prompt_chars)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
    print(markdown(rep))


if __name__ == "__main__":
    main(sys.argv[1:])
