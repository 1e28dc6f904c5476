"""Autocomplete latency: time to first token cold vs one keystroke later, and abort storms.

    python -m bench.autocomplete [--model NAME] [--prompt-tokens 1500] [--rounds 5] [--json F]

* TTFT cold: a ~N-token file the server has not seen (a fresh variant each round).
* TTFT warm: the same file plus one typed character, right after the cold request; the shared
  prefix's KV cache is reused, so only the new tail is evaluated.
* Abort storm: 20 streaming requests that are dropped after their first event, then one real
  request; its latency against the same request on an idle server is the delay the storm adds.
Rounds alternate which side goes first; medians with min/max.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

from bench import client
from bench.harness import codeserve, summary, target


def source_text(n_chars: int, salt: int) -> str:
    root = Path(__file__).resolve().parent.parent / "server"
    text = "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))
    return f"# variant {salt}\n" + text[:n_chars]


def ttft(url: str, model: str, prompt: str) -> tuple[float, int]:
    """(seconds to the first streamed token, cached prompt tokens)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first, cached = None, 0
    t0 = time.perf_counter()
    for arrived, line in client.connection(url).lines("/v1/completions", body):
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if first is None and event["choices"]:
            first = arrived - t0
        if event.get("usage"):
            cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
    return first or float("nan"), cached


def real_request(url: str, model: str, salt: str) -> float:
    """Latency of a short request whose prompt nobody has cached (so both sides start cold)."""
    t0 = time.perf_counter()
    client.post(
        url,
        "/v1/completions",
        {"model": model, "prompt": f"# {salt}\ndef real():\n", "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    return time.perf_counter() - t0


def abort_storm(url: str, model: str, n: int = 20) -> None:
    def one(i: int) -> None:
        body = {
            "model": model,
            "prompt": f"# keystroke {i}\ndef f",
            "max_tokens": 200,
            "stream": True,
        }
        with (
            httpx.Client(timeout=60) as c,
            c.stream("POST", url + "/v1/completions", json=body) as r,
        ):
            for _ in r.iter_lines():
                break

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-chars", type=int, default=5000, help="~1500 tokens of Python")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res: dict[str, list[float]] = {
        "ttft_cold_ms": [],
        "ttft_warm_ms": [],
        "idle_ms": [],
        "after_storm_ms": [],
    }
    cached: list[int] = []
    with codeserve(target(args.model)) as url:
        client.check_overhead(url)
        real_request(url, args.model, "warm-up")
        for r in range(args.rounds):
            prompt = source_text(args.prompt_chars, r)
            cold, _ = ttft(url, args.model, prompt)
            warm, hit = ttft(url, args.model, prompt + "x")
            res["ttft_cold_ms"].append(cold * 1e3)
            res["ttft_warm_ms"].append(warm * 1e3)
            cached.append(hit)
            order = ("idle", "storm") if r % 2 == 0 else ("storm", "idle")
            for side in order:
                if side == "storm":
                    abort_storm(url, args.model)
                    res["after_storm_ms"].append(real_request(url, args.model, f"s{r}") * 1e3)
                else:
                    res["idle_ms"].append(real_request(url, args.model, f"i{r}") * 1e3)
            print(
                f"round {r}: cold {cold * 1e3:.0f} ms, warm {warm * 1e3:.0f} ms "
                f"({hit} cached), real request idle {res['idle_ms'][-1]:.0f} ms, after storm "
                f"{res['after_storm_ms'][-1]:.0f} ms",
                file=sys.stderr,
            )
    report = {
        "model": args.model,
        "cached_tokens": cached,
        **{k: summary(v) for k, v in res.items()},
    }
    report["ttft_warm_over_cold"] = (
        report["ttft_warm_ms"]["median"] / report["ttft_cold_ms"]["median"]
    )
    report["storm_delay_ms"] = report["after_storm_ms"]["median"] - report["idle_ms"]["median"]
    print("| figure | median | min–max |\n|---|---|---|")
    for k in res:
        v = report[k]
        print(f"| {k} | {v['median']:.1f} | {v['min']:.1f}–{v['max']:.1f} |")
    print(f"| warm/cold TTFT | {report['ttft_warm_over_cold']:.3f} | |")
    print(f"| delay added by 20 aborted requests | {report['storm_delay_ms']:.1f} ms | |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
