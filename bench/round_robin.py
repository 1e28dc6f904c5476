"""The suite's short autocomplete/FIM prompts sent round robin: does a server still hold them all?

    python -m bench.round_robin --url URL [--url2 URL] [--model NAME] [--laps 4]

The eight prompts of ``bench.workloads`` (six autocompletes, two pre-templated FIM edits) go to
each peer in order, lap after lap, streamed on ``/v1/completions`` as the suite sends them. The
first lap finds nothing cached; from the second on, each prompt was last seen seven requests ago,
so a server that keeps fewer than eight prompts evaluates it again. Peers are interleaved lap by
lap with the order rotating. Reported: median (min–max) time to first token from lap 2 on, and
the first lap's for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from bench import client, workloads
from bench.harness import summary
from bench.report import _fmt


def prompts() -> list[str]:
    return workloads.AUTOCOMPLETE + workloads.FIM_EDITS


def measure(
    urls: dict[str, str],
    model: str,
    laps: int = 4,
    tokens: int = 32,
    step: Callable[[], object] | None = None,
) -> dict:
    """{peer: TTFT ms per prompt, per lap}, their summaries, and the settings."""
    peers = list(urls)
    ttft: dict[str, list[list[float]]] = {p: [] for p in peers}
    for lap in range(laps):
        for peer in peers[lap % len(peers) :] + peers[: lap % len(peers)]:
            ttft[peer].append(
                [
                    client.stream(
                        urls[peer],
                        {
                            "model": model,
                            "prompt": prompt,
                            "max_tokens": tokens,
                            "temperature": 0,
                            "stop": workloads.STOPS,
                        },
                    ).ttft_s
                    * 1e3
                    for prompt in prompts()
                ]
            )
            if step:
                step()
    return {
        "meta": {"prompts": len(prompts()), "laps": laps, "tokens": tokens},
        "laps": ttft,
        "figures": summarise(ttft),
    }


def summarise(laps: dict[str, list[list[float]]]) -> dict[str, dict]:
    return {
        peer: {
            "ttft_ms": summary([ms for lap in by_lap[1:] for ms in lap]),
            "first_lap_ms": summary(by_lap[0] if by_lap else []),
        }
        for peer, by_lap in laps.items()
    }


def markdown(figures: dict[str, dict], n_prompts: int, laps: int) -> str:
    lines = [
        f"The suite's {n_prompts} short autocomplete/FIM prompts round robin, {laps} laps: time "
        "to first token, ms, median (min–max).",
        "",
        "| peer | laps 2 on | first lap (cold) |",
        "|---|---|---|",
    ]
    for peer, f in figures.items():
        lines.append(f"| {peer} | {_fmt(f['ttft_ms'])} | {_fmt(f['first_lap_ms'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.round_robin", description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--url2")
    ap.add_argument("--names", default="codeserve,llama-server")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--laps", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    urls = dict(zip(args.names.split(","), [u for u in (args.url, args.url2) if u], strict=False))
    for url in urls.values():
        client.check_overhead(url)
    out = measure(urls, args.model, args.laps, args.tokens)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(markdown(out["figures"], out["meta"]["prompts"], args.laps))


if __name__ == "__main__":
    main(sys.argv[1:])
