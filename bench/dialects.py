"""Time to first token through each dialect, on the same FIM model and the same fill-in-the-middle.

    python -m bench.dialects [--url URL] [--model NAME] [--rounds 5] [--prefix-chars 2000]

The same prefix/suffix (salted per request, so every request starts cold) goes through
llama-server's ``/infill``, Ollama's ``/api/generate`` (``suffix``; skipped when the server
answers 404) and OpenAI's ``/v1/completions`` (``suffix``), interleaved round by round with the
order rotating; medians with min–max. The client is ``bench.client``'s persistent connection,
checked to cost under 1 ms per request before anything is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench import client
from bench.harness import codeserve, summary

Body = Callable[[str, str, str, int], dict]


def _native_text(line: bytes) -> tuple[str, dict | None]:
    if not line.startswith(b"data: {"):
        return "", None
    event = json.loads(line[6:])
    return event.get("content") or "", event


def _ndjson_text(line: bytes) -> tuple[str, dict | None]:
    line = line.strip()
    if not line.startswith(b"{"):
        return "", None
    event = json.loads(line)
    return event.get("response") or "", event


DIALECTS: dict[str, tuple[str, Body, client.TextOf]] = {
    "/infill": (
        "/infill",
        lambda model, pre, suf, n: {
            "model": model,
            "input_prefix": pre,
            "input_suffix": suf,
            "n_predict": n,
            "temperature": 0,
            "stream": True,
        },
        _native_text,
    ),
    "/api/generate": (
        "/api/generate",
        lambda model, pre, suf, n: {
            "model": model,
            "prompt": pre,
            "suffix": suf,
            "stream": True,
            "options": {"num_predict": n, "temperature": 0},
        },
        _ndjson_text,
    ),
    "/v1/completions": (
        "/v1/completions",
        lambda model, pre, suf, n: {
            "model": model,
            "prompt": pre,
            "suffix": suf,
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
        },
        client.sse_text,
    ),
}


def fim_text(prefix_chars: int) -> tuple[str, str]:
    """A prefix of about `prefix_chars` characters of this repository's code, and a suffix."""
    root = Path(__file__).resolve().parent.parent / "server"
    code = "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))
    return code[:prefix_chars] + "\n\ndef circle_area(radius):\n    ", "\n\n\nprint(area(2))\n"


def run(url: str, model: str, rounds: int, prefix_chars: int, tokens: int) -> dict[str, Any]:
    overhead = client.check_overhead(url)
    prefix, suffix = fim_text(prefix_chars)
    ttft: dict[str, list[float]] = {name: [] for name in DIALECTS}
    skipped: dict[str, str] = {}
    names = list(DIALECTS)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in skipped:
                continue
            path, body, text_of = DIALECTS[name]
            salted = f"# request {uuid.uuid4().hex}\n{prefix}"
            try:
                s = client.stream_text(url, path, body(model, salted, suffix, tokens), text_of)
            except client.HttpError as e:
                if e.status != 404:
                    raise
                skipped[name] = "the server answers 404 (route not served)"
                continue
            ttft[name].append(s.ttft_s * 1e3)
    return {
        "model": model,
        "rounds": rounds,
        "prefix_chars": prefix_chars,
        "tokens": tokens,
        "client_overhead": overhead,
        "ttft_ms": {name: summary(v) for name, v in ttft.items() if name not in skipped},
        "skipped": skipped,
    }


def markdown(out: dict[str, Any]) -> str:
    lines = [
        f"Time to first token, {out['model']}, ~{out['prefix_chars']}-character prefix, cold, "
        f"{out['rounds']} interleaved rounds: median (min–max)",
        "",
        "| route | TTFT ms |",
        "|---|---|",
    ]
    for name, s in out["ttft_ms"].items():
        lines.append(f"| {name} | {s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}) |")
    for name, why in out["skipped"].items():
        lines.append(f"| {name} | skipped: {why} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.dialects", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--url", help="a running codeserve (default: start one on models.toml)")
    ap.add_argument("--model", help="a model with FIM tokens (default: the server's default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefix-chars", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=16, help="tokens to generate per request")
    ap.add_argument("--quick", action="store_true", help="one round, short prefix, 4 tokens")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.prefix_chars, args.tokens = 1, 300, 4
    with nullcontext(args.url) if args.url else codeserve() as url:
        model = (
            args.model or json.loads(client.connection(url).request("GET", "/health")[1])["model"]
        )
        out = run(url, model, args.rounds, args.prefix_chars, args.tokens)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(markdown(out))


if __name__ == "__main__":
    main(sys.argv[1:])
