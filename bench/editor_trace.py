"""An editor session as a tab-autocomplete client drives a server: five files, round robin.

    python -m bench.editor_trace --url URL [--url2 URL] --model NAME [--rounds 3]

Five real source files (this repository's server/ modules, ~1,300 tokens each, salted per run so
no server has them cached from an earlier run) are visited round robin. Each visit makes one small
edit (a line typed or changed near the cursor; sometimes an import added near the top while the
cursor stays where it was) and sends what Continue's ``llama.cpp`` provider sends for
autocomplete: ``POST /completion`` with the FIM template rendered by the client (prefix = the
file up to the cursor, suffix = the rest), small ``n_predict``, streamed. Right after, the same
request one keystroke later. Both peers (codeserve, llama.cpp's llama-server) tokenize that text
identically; ``/infill`` is not used because llama-server trims its prefix and suffix to fit one
batch (3/4 and 1/4 of ``n_batch``), so the two servers would evaluate different prompts.

Figures per peer, time to first token (first token event on the wire), median (min–max):
cold (first visit of each file), return (the file again after the four others), warm (one
keystroke later), and return/warm, which issue #13 wants at most 2. The servers' own counts of
prompt tokens evaluated vs taken from cache are reported next to them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import client
from bench.editor_session import (
    FILE_TOKENS,
    N_FILES,
    TEMPLATES,
    Fim,
    Template,
    Visit,
    make_trace,
    source_files,
)
from bench.harness import summary
from bench.report import _fmt


def server_tokens(url: str, model: str | None) -> Callable[[str], int]:
    """Token counts from a server's ``/tokenize`` (both peers serve it, special tokens parsed)."""

    def count(text: str) -> int:
        body = {"content": text, **({"model": model} if model else {})}
        return len(client.post(url, "/tokenize", body)["tokens"])

    return count


def pick_template(count: Callable[[str], int]) -> Template:
    """The first template whose three markers are single tokens of the model; else StarCoder's."""
    for t in TEMPLATES.values():
        if all(count(m) == 1 for m in (t.pre, t.suf, t.mid)):
            return t
    return TEMPLATES["starcoder"]


def _send(url: str, model: str | None, fim: Fim, template: Template, tokens: int) -> dict:
    """One Continue-shaped request: TTFT from the wire, and the server's own prompt counts."""
    timings: dict = {}

    def text_of(line: bytes) -> tuple[str, dict | None]:
        if not line.startswith(b"data: {"):
            return "", None
        event = json.loads(line[6:])
        timings.update(event.get("timings") or {})
        return event.get("content") or "", event

    body = {
        "prompt": fim.prompt(template),
        "stream": True,
        "n_predict": tokens,
        "stop": list(template.stops),
        "temperature": 0,
        **({"model": model} if model else {}),
    }
    s = client.stream_text(url, "/completion", body, text_of)
    return {
        "ttft_ms": s.ttft_s * 1e3,
        "prompt_n": timings.get("prompt_n"),
        "cache_n": timings.get("cache_n"),
    }


def run(
    urls: dict[str, str],
    model: str | None,
    visits: list[Visit],
    template: Template,
    tokens: int = 16,
    step: Callable[[], object] | None = None,
) -> list[dict]:
    """Every visit on every peer, interleaved visit by visit with the peers' order rotating.

    Each peer is its own server, so another peer's requests never touch its cache. `step()`
    is called after each visit on each peer (a progress bar).
    """
    peers = list(urls)
    records = []
    for v in visits:
        k = v.index % len(peers)
        for peer in peers[k:] + peers[:k]:
            for kind, fim in ((v.kind, v.request), ("warm", v.keystroke)):
                out = _send(urls[peer], model, fim, template, tokens)
                records.append(
                    {"peer": peer, "visit": v.index, "file": v.file, "edit": v.edit}
                    | {"kind": kind, **out}
                )
            if step:
                step()
    return records


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per peer: TTFT summaries for cold / return (all, local edits, top edits) / warm, the
    return/warm ratio of medians, and median prompt tokens evaluated (not from cache) per kind."""
    groups = {
        "cold_ms": lambda r: r["kind"] == "cold",
        "return_ms": lambda r: r["kind"] == "return",
        "return_local_ms": lambda r: r["kind"] == "return" and r["edit"] == "local",
        "return_top_ms": lambda r: r["kind"] == "return" and r["edit"] == "top",
        "warm_ms": lambda r: r["kind"] == "warm",
    }
    out: dict[str, dict] = {}
    for peer in dict.fromkeys(r["peer"] for r in records):
        mine = [r for r in records if r["peer"] == peer]
        fig: dict = {
            k: summary([r["ttft_ms"] for r in mine if keep(r)]) for k, keep in groups.items()
        }
        fig["return_over_warm"] = fig["return_ms"]["median"] / fig["warm_ms"]["median"]
        fig["evaluated_tokens"] = {
            k.removesuffix("_ms"): summary(
                [r["prompt_n"] for r in mine if keep(r) and r["prompt_n"] is not None]
            )["median"]
            for k, keep in groups.items()
        }
        sizes = [r["prompt_n"] + r["cache_n"] for r in mine if r["prompt_n"] is not None]
        fig["prompt_tokens"] = summary(sizes)["median"] if sizes else float("nan")
        out[peer] = fig
    return out


def _cell(ttft: dict, evaluated: float) -> str:
    return _fmt(ttft) + (f" [{evaluated:.0f}]" if evaluated == evaluated else "")


ROWS = [
    ("cold_ms", "cold: first visit of a file"),
    ("return_ms", "return: the file again after the 4 others"),
    ("return_local_ms", "… edit near the cursor"),
    ("return_top_ms", "… import added near the top"),
    ("warm_ms", "warm: one keystroke later"),
]


def markdown(figures: dict[str, dict], meta: dict) -> str:
    peers = list(figures)
    lines = [
        f"Editor trace: {meta['files']} files of ~{meta['prompt_tokens']:.0f} tokens, "
        f"{meta['rounds']} rounds, one edit per visit, Continue-shaped `/completion` FIM "
        f"requests, `n_predict` {meta['tokens']}. Time to first token, ms, median (min–max); "
        "in square brackets, the prompt tokens the server evaluated (median; the rest came "
        "from its cache).",
        "",
        "| figure | " + " | ".join(peers) + " |",
        "|---|" + "---|" * len(peers),
    ]
    for key, label in ROWS:
        cells = [_cell(figures[p][key], figures[p]["evaluated_tokens"][key[:-3]]) for p in peers]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| return / warm (issue #13: ≤ 2) | "
        + " | ".join(f"{figures[p]['return_over_warm']:.2f}" for p in peers)
        + " |"
    )
    return "\n".join(lines) + "\n"


def measure(
    urls: dict[str, str],
    model: str | None,
    rounds: int,
    file_tokens: int = FILE_TOKENS,
    tokens: int = 16,
    seed: int = 0,
    salt: str | None = None,
    step: Callable[[], object] | None = None,
    visits: int | None = None,
) -> dict:
    """The trace on every peer (its first `visits` visits when given); the JSON-ready result
    (figures, meta, every request)."""
    salt = salt or f"session {time.time_ns()}"
    count = server_tokens(next(iter(urls.values())), model)  # one vocabulary for every peer
    template = pick_template(count)
    trace = make_trace(source_files(file_tokens, salt, count), rounds, seed)[:visits]
    records = run(urls, model, trace, template, tokens, step)
    figures = summarise(records)
    sizes = [
        f["prompt_tokens"] for f in figures.values() if f["prompt_tokens"] == f["prompt_tokens"]
    ]
    meta = {
        "files": N_FILES,
        "file_tokens": file_tokens,
        "template": template.pre,
        "prompt_tokens": max(sizes) if sizes else float("nan"),
        "rounds": rounds,
        "tokens": tokens,
        "seed": seed,
        "salt": salt,
        "route": "/completion",
    }
    return {"meta": meta, "figures": figures, "records": records}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.editor_trace", description=__doc__)
    ap.add_argument("--url", required=True, help="a running server (codeserve or llama-server)")
    ap.add_argument("--url2", help="a second server, measured interleaved with the first")
    ap.add_argument("--names", default="codeserve,llama-server", help="the two peers' names")
    ap.add_argument("--model", help="model name sent in each request (llama-server ignores it)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--file-tokens", type=int, default=FILE_TOKENS, help="tokens per file")
    ap.add_argument("--tokens", type=int, default=16, help="n_predict per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--visits", type=int, help="only the first N visits (a quick check)")
    ap.add_argument("--json", type=Path, help="also write figures and every request here")
    args = ap.parse_args(argv)
    names = args.names.split(",")
    urls = dict(zip(names, [u for u in (args.url, args.url2) if u], strict=False))
    for url in urls.values():
        client.check_overhead(url)
    out = measure(
        urls,
        args.model,
        args.rounds,
        args.file_tokens,
        args.tokens,
        args.seed,
        visits=args.visits,
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(markdown(out["figures"], out["meta"]))


if __name__ == "__main__":
    main(sys.argv[1:])
