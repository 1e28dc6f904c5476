"""KV cache types: bytes at the configured context, perplexity against f16, decode speed.

    python -m bench.kvcache [--model NAME] [--corpus stdlib] [--ctx 512] [--windows 16]
                            [--rounds 3] [--json PATH]

For f16, q8_0 and q4_0 (K and V alike, flash attention on for the quantized ones, as codeserve
loads them):

* bytes: what codeserve budgets (``ModelInfo.kv_cache_bytes``) next to what llama.cpp says it
  allocated (its ``llama_kv_cache: size = ...`` log line), at the model's configured n_ctx;
* quality: perplexity on the quantize tool's code corpus (same windows for every type, each
  evaluated in one batch so attention reads the cache in the type under test), the change against
  f16, KL(f16 || type) and top-1 agreement with f16;
* speed: greedy decode tokens/s after a long prompt (attention over many cached tokens is where
  the cache type shows), medians over interleaved rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TYPES = ("f16", "q8_0", "q4_0")
_SIZE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")


def _load(path: Path, kv: str, n_ctx: int, threads: int, *, logits_all: bool = False):
    import llama_cpp

    t = getattr(llama_cpp, f"GGML_TYPE_{kv.upper()}")
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_ubatch=min(n_ctx, 512),
        n_threads=threads,
        n_threads_batch=threads,
        type_k=t,
        type_v=t,
        flash_attn=kv != "f16",
        logits_all=logits_all,
        verbose=False,
    )


def llama_cpp_kv_bytes(path: Path, kv: str, n_ctx: int, threads: int) -> int | None:
    """The KV cache size llama.cpp reports while creating a context (its own figure)."""
    import llama_cpp
    import llama_cpp._logger as lib_logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(_level, text, _user):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        _load(path, kv, n_ctx, threads).close()
    finally:
        llama_cpp.llama_log_set(lib_logger.llama_log_callback, ctypes.c_void_p(0))
    m = _SIZE.search("".join(lines))
    return int(float(m.group(1)) * (1 << 20)) if m else None


def codeserve_kv_bytes(path: Path, kv: str, n_ctx: int) -> int:
    from server.engine.llama import LlamaEngine
    from server.registry import ModelConfig

    cfg = ModelConfig(name="kv", source={"path": path}, n_ctx=n_ctx, kv_cache=kv)
    engine = LlamaEngine(path, cfg)
    try:
        return engine.info.kv_cache_bytes
    finally:
        engine.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def quality(path: Path, corpus: str, ctx: int, windows: int, threads: int) -> dict[str, dict]:
    """Perplexity per KV type, and its distance from f16 on the same windows."""
    from quantize.corpus import load_corpus, make_windows

    results: dict[str, dict] = {}
    ref: list[np.ndarray] = []
    for kv in TYPES:
        llm = _load(path, kv, ctx, threads, logits_all=True)
        try:
            bos = llm.token_bos() if llm._model.add_bos_token() else None
            wins = make_windows(
                load_corpus(corpus),
                lambda s, llm=llm: llm.tokenize(s.encode(), add_bos=False),
                ctx,
                windows,
                bos if bos is not None and bos >= 0 else None,
            )
            nll, kld, top1 = [], [], []
            for w, window in enumerate(wins):
                llm.reset()
                llm.eval(window)
                logq = _log_softmax(np.array(llm.scores[: len(window) - 1]))
                nll.append(-logq[np.arange(len(window) - 1), window[1:]])
                if kv == "f16":
                    ref.append(logq)
                    continue
                logp = ref[w]
                kld.append((np.exp(logp) * (logp - logq)).sum(axis=1))
                top1.append(logp.argmax(axis=1) == logq.argmax(axis=1))
        finally:
            llm.close()
        ppl = float(np.exp(np.concatenate(nll).mean()))
        results[kv] = {
            "ppl": ppl,
            "kld": float(np.concatenate(kld).mean()) if kld else 0.0,
            "top1": float(np.concatenate(top1).mean()) if top1 else 1.0,
            "tokens": sum(len(w) - 1 for w in wins),
        }
        print(f"  {kv}: ppl {ppl:.4f}", file=sys.stderr)
    for kv in TYPES:
        results[kv]["ppl_change"] = results[kv]["ppl"] / results["f16"]["ppl"] - 1
    return results


def decode_speed(path: Path, n_ctx: int, threads: int, rounds: int, prompt_tokens: int) -> dict:
    """Greedy tokens/s after a long prompt, per type, interleaved round by round."""
    from bench.workloads import long_prompt

    llms = {kv: _load(path, kv, n_ctx, threads) for kv in TYPES}
    runs: dict[str, list[float]] = {kv: [] for kv in TYPES}
    try:
        for r in range(rounds):
            order = TYPES[r % 3 :] + TYPES[: r % 3]
            for kv in order:
                llm = llms[kv]
                prompt = llm.tokenize(long_prompt(prompt_tokens * 4, f"kv{r}").encode())
                prompt = prompt[:prompt_tokens]
                llm.reset()
                llm.eval(prompt)
                t0 = time.perf_counter()
                for _ in range(48):
                    row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), (llm.n_vocab(),))
                    llm.eval([int(row.argmax())])
                runs[kv].append(48 / (time.perf_counter() - t0))
    finally:
        for llm in llms.values():
            llm.close()
    return {kv: {"median": statistics.median(v), "runs": v} for kv, v in runs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="registry model (default: the default model)")
    ap.add_argument("--corpus", default="stdlib", help="the quantize tool's corpus")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per perplexity window")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="decode-speed rounds")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from bench.harness import target

    t = target(args.model)
    print(f"{t.name}: {t.path.name}, n_ctx {t.n_ctx}, {t.threads} threads", file=sys.stderr)
    rep: dict = {"model": t.name, "file": t.path.name, "n_ctx": t.n_ctx, "types": {}}
    for kv in TYPES:
        rep["types"][kv] = {
            "codeserve_bytes": codeserve_kv_bytes(t.path, kv, t.n_ctx),
            "llama_cpp_bytes": llama_cpp_kv_bytes(t.path, kv, t.n_ctx, t.threads),
        }
    q = quality(t.path, args.corpus, args.ctx, args.windows, t.threads)
    speed = decode_speed(t.path, 4096, t.threads, args.rounds, args.prompt_tokens)
    f16 = rep["types"]["f16"]["llama_cpp_bytes"] or rep["types"]["f16"]["codeserve_bytes"]
    lines = [
        f"KV cache at n_ctx={t.n_ctx} ({t.name}); perplexity on {args.corpus}, "
        f"{q['f16']['tokens']} tokens in {args.ctx}-token windows; decode after "
        f"{args.prompt_tokens} prompt tokens\n",
        "| type | bytes (codeserve) | bytes (llama.cpp) | × f16 | perplexity | change | "
        "KL vs f16 | top-1 vs f16 | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kv in TYPES:
        row = rep["types"][kv]
        row.update(q[kv])
        row["decode_tps"] = speed[kv]
        own = row["llama_cpp_bytes"] or row["codeserve_bytes"]
        row["ratio"] = own / f16
        lines.append(
            f"| {kv} | {row['codeserve_bytes'] / 2**20:.2f} MiB | "
            f"{(row['llama_cpp_bytes'] or 0) / 2**20:.2f} MiB | {row['ratio']:.3f} | "
            f"{row['ppl']:.4f} | {row['ppl_change']:+.2%} | {row['kld']:.5f} | "
            f"{row['top1']:.2%} | {speed[kv]['median']:.1f} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
