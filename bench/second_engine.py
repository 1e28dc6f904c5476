"""A second engine in the server: one stream's decode before and after an embeddings request.

    python -m bench.second_engine [--starts 2] [--rounds 4] [--tokens 128] [--json PATH]

An editor indexing the codebase (Continue's embeddings) while it completes code runs two models
in one codeserve process: the default model and the embedding model, each engine with a thread
of its own. llama.cpp's CPU backend meets its threads at OpenMP barriers, and libgomp lets a
waiting thread spin only briefly once the process has more OpenMP threads than cores, which the
second engine's team brings (``server/__init__.py``). Two configurations of codeserve on the
user's ``models.toml``: ``codeserve`` as it starts, and ``libgomp default``, started with
``GOMP_SPINCOUNT`` set to libgomp's own default, which leaves libgomp's wait policy as it was
before codeserve set one. Each is started ``--starts`` times, alternately, one server at a time
(a second server beside it, idle or not, moves the figures); each start streams
``--rounds`` requests (``bench.shared_cpu``'s: a HumanEval prompt with a fresh first line,
greedy, ``ignore_eos``), sends one ``/v1/embeddings`` request, and streams the same requests
again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from bench import client
from bench.harness import codeserve, target, token_counter
from bench.workloads import humaneval, salted_decode_body

EMBEDDING_MODEL = "all-minilm-l6-v2"
# What each server's environment adds to this process's (where importing ``server`` set both):
# nothing, so codeserve sets them itself; or libgomp's default spin count alone, which leaves
# libgomp's wait policy as it was before codeserve chose one.
SERVERS: dict[str, dict[str, str | None]] = {
    "codeserve": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},
    "libgomp default": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"},
}


def _decode_rounds(
    url: str, model: str, rounds: int, tokens: int, count: Callable[[str], int]
) -> list[float]:
    problems = humaneval()
    out = []
    for r in range(rounds):
        body = salted_decode_body(model, problems[r % len(problems)], tokens)
        out.append(client.stream(url, body, count=count).decode_tok_s)
    return out


def measure(model: str, starts: int, rounds: int, tokens: int) -> dict:
    runs: dict[str, dict[str, list[float]]] = {
        name: {"before": [], "after": []} for name in SERVERS
    }
    count = token_counter(target(model).path, prompt=False)
    for i in range(starts):
        for name in list(SERVERS) if i % 2 == 0 else list(SERVERS)[::-1]:
            with codeserve(env=SERVERS[name]) as url:
                runs[name]["before"] += _decode_rounds(url, model, rounds, tokens, count)
                body = {"model": EMBEDDING_MODEL, "input": "def f(): pass"}
                client.post(url, "/v1/embeddings", body)
                runs[name]["after"] += _decode_rounds(url, model, rounds, tokens, count)
    return {
        "starts": starts,
        "rounds": rounds,
        "tokens": tokens,
        "rows": [
            {
                "server": name,
                "before": statistics.median(r["before"]),
                "after": statistics.median(r["after"]),
                "runs": r,
            }
            for name, r in runs.items()
        ],
    }


def markdown(rep: dict) -> str:
    out = [
        f"One stream, {rep['tokens']} tokens, decode tokens/s, medians of {rep['rounds']} "
        f"requests in each of {rep['starts']} starts per server\n",
        "| server | before any embeddings request | after one | after / before |",
        "|---|---:|---:|---:|",
    ]
    for row in rep["rows"]:
        out.append(
            f"| {row['server']} | {row['before']:.1f} | {row['after']:.1f} "
            f"| {row['after'] / row['before']:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starts", type=int, default=2, help="servers started per configuration")
    ap.add_argument("--rounds", type=int, default=4, help="requests before and after, per start")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    model = target().name
    target(EMBEDDING_MODEL)  # pulled before the servers start, so no request waits for it
    rep = measure(model, args.starts, args.rounds, args.tokens)
    print(markdown(rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
