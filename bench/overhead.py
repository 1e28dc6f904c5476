"""Gateway overhead: codeserve over HTTP (SSE) vs raw in-process ``llama_cpp.Llama``.

Same model file, context size, threads and greedy sampling on both sides; runs are interleaved
(A B A B …) so drift on a shared machine hits both, and medians are reported with min/max.

    python -m bench.overhead [--model NAME] [--tokens 256] [--rounds 5] [--json FILE]

Figures: decode tokens/s (first token → last, streamed), and time to first token for a fresh
(uncached) ~500-token prompt.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import httpx

from bench.harness import codeserve, summary
from server.engine.llama import _available_cores
from server.registry import load_registry
from server.settings import ServerSettings
from server.store import ModelStore

DECODE_PROMPT = "# A long Python module of utility functions\n\nimport os\nimport sys\n\n\ndef "


def long_prompt(llm, n_tokens: int, salt: int) -> str:
    """~n_tokens of real Python source (this repo's own server code), unique per salt."""
    root = Path(__file__).resolve().parent.parent / "server"
    text = f"# variant {salt}\n" + "\n".join(
        inspect.cleandoc(p.read_text()) for p in sorted(root.rglob("*.py"))
    )
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:n_tokens]
    return llm.detokenize(ids).decode("utf-8", errors="ignore")


def raw_stream(llm, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, decode_tok_s, tokens) for llama-cpp-python's own streaming completion."""
    t0 = time.perf_counter()
    first = last = t0
    n = 0
    for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
        last = time.perf_counter()
        if n == 0:
            first = last
        n += 1
    return first - t0, (n - 1) / (last - first) if n > 1 else 0.0, n


def http_stream(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = t0
    chunks, n = 0, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                last = time.perf_counter()
                if chunks == 0:
                    first = last
                chunks += 1
    return first - t0, (n - 1) / (last - first) if n > 1 else 0.0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=256, help="tokens to decode per run")
    ap.add_argument("--prompt-tokens", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import llama_cpp

    settings = ServerSettings()
    registry = load_registry(settings.models_file)
    cfg = registry.models[args.model or registry.default_model]
    path = ModelStore(registry, settings.cache_dir).pull(cfg)
    threads = cfg.n_threads or _available_cores()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=cfg.n_ctx,
        n_batch=cfg.n_batch,
        n_ubatch=cfg.n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=cfg.n_gpu_layers,
        verbose=False,
    )
    res: dict[str, dict[str, list[float]]] = {
        side: {"decode_tok_s": [], "ttft_500_ms": []} for side in ("raw", "http")
    }
    with codeserve(cfg.name) as url:
        http_stream(url, cfg.name, DECODE_PROMPT, 8)  # warm-up both sides
        raw_stream(llm, DECODE_PROMPT, 8)
        for r in range(args.rounds):
            for side in ("raw", "http") if r % 2 == 0 else ("http", "raw"):
                run = (
                    (lambda p, n: raw_stream(llm, p, n))
                    if side == "raw"
                    else (lambda p, n: http_stream(url, cfg.name, p, n))
                )
                _, tps, n = run(DECODE_PROMPT, args.tokens)
                res[side]["decode_tok_s"].append(tps)
                salt = r * 2 + (side == "http")  # a prompt neither side has cached
                ttft, _, _ = run(long_prompt(llm, args.prompt_tokens, salt), 1)
                res[side]["ttft_500_ms"].append(ttft * 1e3)
                print(
                    f"round {r} {side:4s} decode {tps:6.1f} tok/s ({n} tokens)  "
                    f"ttft {ttft * 1e3:6.1f} ms",
                    file=sys.stderr,
                )
    report = {
        "model": cfg.name,
        "file": path.name,
        "threads": threads,
        "n_ctx": cfg.n_ctx,
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "llama_cpp_python": llama_cpp.__version__,
        **{side: {k: summary(v) for k, v in figs.items()} for side, figs in res.items()},
    }
    report["decode_ratio_http_vs_raw"] = (
        report["http"]["decode_tok_s"]["median"] / report["raw"]["decode_tok_s"]["median"]
    )
    report["ttft_ratio_http_vs_raw"] = (
        report["http"]["ttft_500_ms"]["median"] / report["raw"]["ttft_500_ms"]["median"]
    )
    print("| figure | raw Llama | codeserve HTTP | ratio |\n|---|---|---|---|")
    for key, unit in (("decode_tok_s", "tok/s"), ("ttft_500_ms", "ms")):
        a, b = report["raw"][key], report["http"][key]
        print(
            f"| {key} | {a['median']:.1f} {unit} ({a['min']:.1f}–{a['max']:.1f}) | "
            f"{b['median']:.1f} {unit} ({b['min']:.1f}–{b['max']:.1f}) | "
            f"{b['median'] / a['median']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
