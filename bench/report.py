"""Benchmark output: JSON (everything), a Markdown table, a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

FIGURES = [
    ("decode_tok_s", "decode tokens/s (HumanEval prompts)", True),
    ("prefill_tok_s", "prefill tokens/s (long prompt)", True),
    ("ttft_ms", "time to first token, ms (autocomplete + FIM)", False),
    ("latency_p50_ms", "request latency p50, ms", False),
    ("latency_p95_ms", "request latency p95, ms", False),
]


def _fmt(s: dict | None) -> str:
    if not s or math.isnan(s["median"]):
        return "–"
    if s["min"] == s["max"]:
        return f"{s['median']:.1f}"
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def _conditions(rep: dict) -> list[str]:
    """The background load and the client's own cost per request, when the report has them."""
    out = []
    n = rep.get("plan", {}).get("contention", 0)
    if n:
        out.append(f"Contended: {n} busy-loop process{'es' if n != 1 else ''} ran throughout.")
    overhead = rep.get("client_overhead") or {}
    if overhead:
        out.append(
            "Client overhead per request (CPU, on a trivial endpoint): "
            + ", ".join(f"{p} {o['cpu_s'] * 1e3:.2f} ms" for p, o in overhead.items())
            + "."
        )
    return [*out, ""] if out else []


def _libraries(rep: dict) -> list[str]:
    """Where each peer's llama.cpp libraries were loaded from: the build it really ran."""
    by_peer = rep.get("libraries") or {}
    lines = []
    for peer, paths in by_peer.items():
        dirs: dict[str, list[str]] = {}
        for path in paths:
            dirs.setdefault(str(Path(path).parent), []).append(Path(path).name)
        where = "; ".join(f"`{d}/` ({', '.join(names)})" for d, names in dirs.items())
        lines.append(f"- {peer}: {where or 'not read'}")
    return ["", "llama.cpp libraries each peer loaded:", *lines] if lines else []


def markdown(rep: dict) -> str:
    peers = rep["peers"]
    m, model = rep["machine"], rep["model"]
    lines = [
        f"### {model['name']} ({model['file']}) on {m['name']} — {rep['date']}",
        "",
        f"{m['cpu']}, {m['cpus']} CPUs, llama-cpp-python {m['llama_cpp_python']}; "
        f"{model['threads']} threads, n_ctx {model['n_ctx']}, KV cache {model['kv_cache']}. "
        "Medians (min–max) of interleaved rounds.",
        "",
        *_conditions(rep),
        "| figure | " + " | ".join(peers) + " |",
        "|---|" + "---|" * len(peers),
    ]
    single = rep["single_stream"]
    for key, label, _ in FIGURES:
        lines.append(
            f"| {label} | " + " | ".join(_fmt(single.get(p, {}).get(key)) for p in peers) + " |"
        )
    agg = rep["aggregate_tok_s"]
    for c in sorted({int(c) for by in agg.values() for c in by}):
        lines.append(
            f"| aggregate tokens/s, {c} concurrent streams (short prompt, 128 tokens) | "
            + " | ".join(_fmt(agg.get(p, {}).get(str(c))) for p in peers)
            + " |"
        )
    lines += [
        "",
        "codeserve as a ratio of each baseline (>1: codeserve higher):",
        "",
        "| figure | " + " | ".join(rep["ratios_codeserve_over"]) + " |",
        "|---|" + "---|" * len(rep["ratios_codeserve_over"]),
    ]
    keys = sorted({k for r in rep["ratios_codeserve_over"].values() for k in r})
    for k in keys:
        lines.append(
            f"| {k} | "
            + " | ".join(
                f"{r[k]:.2f}" if k in r else "–" for r in rep["ratios_codeserve_over"].values()
            )
            + " |"
        )
    lim = rep["physical_limit"]
    lines += [
        "",
        f"Memory bandwidth {lim['memory_bandwidth_gbs']:.1f} GB/s (array copy); "
        f"a decode step reads ≈{lim['bytes_per_token'] / 2**20:.0f} MiB of weights, so the "
        f"ceiling is ≈{lim['decode_tok_s_limit']:.0f} tokens/s; codeserve decodes at "
        f"{lim['codeserve_fraction'] * 100:.0f}% of it.",
    ]
    lines += _session_figures(rep)
    if rep.get("candidates"):
        c = rep["candidates"]
        lines += [
            "",
            f"{c['n']} candidates for one HumanEval prompt (64 tokens each): one request "
            f"with n={c['n']} took {c['one_request_s']:.1f} s, {c['n']} sequential requests "
            f"{c['sequential_s']:.1f} s: {c['speedup']:.2f}× faster.",
        ]
    if rep.get("variants"):
        lines += [
            "",
            "| codeserve variant | decode tokens/s (HumanEval) | decode tokens/s (code rewrite) |",
            "|---|---|---|",
        ]
        for name, v in rep["variants"].items():
            lines.append(
                f"| {name} | {_fmt(v['decode_tok_s'])} | {_fmt(v.get('rewrite_decode_tok_s'))} |"
            )
    return "\n".join(lines) + "\n"


def _session_figures(rep: dict) -> list[str]:
    """The editor trace and the round robin of short prompts, when the report has them."""
    from bench import editor_trace, round_robin  # they use this module's formatting

    lines = []
    if rep.get("editor_trace"):
        e = rep["editor_trace"]
        lines += ["", editor_trace.markdown(e["figures"], e["meta"]).rstrip("\n")]
    if rep.get("round_robin"):
        r = rep["round_robin"]
        lines += ["", round_robin.markdown(r["figures"], r["meta"]["prompts"], r["meta"]["laps"])]
        lines[-1] = lines[-1].rstrip("\n")
    lines += _libraries(rep)
    if rep.get("llama_server_flags"):
        flags = [Path(f).name if f.endswith(".gguf") else f for f in rep["llama_server_flags"]]
        lines += [
            "",
            f"llama-server's flags: `{' '.join(flags)}`. No prompt-cache flag: its prompt "
            "cache, host-RAM cache (`--cache-ram`) and chunk reuse (`--cache-reuse`, off) are "
            "at its defaults, as a user gets them.",
        ]
    return lines


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for peer, by_c in rep["aggregate_tok_s"].items():
        cs = sorted(int(c) for c in by_c)
        left.plot(cs, [by_c[str(c)]["median"] for c in cs], marker="o", label=peer)
    left.set(
        xlabel="concurrent streams",
        ylabel="aggregate tokens/s",
        title="Throughput under concurrency",
    )
    left.set_xticks(sorted({int(c) for by in rep["aggregate_tok_s"].values() for c in by}))
    left.legend()
    peers = [p for p in rep["peers"] if "decode_tok_s" in rep["single_stream"].get(p, {})]
    vals = [rep["single_stream"][p]["decode_tok_s"]["median"] for p in peers]
    right.bar(peers, vals, color="tab:blue")
    right.axhline(
        rep["physical_limit"]["decode_tok_s_limit"],
        color="tab:red",
        ls="--",
        label="memory-bandwidth ceiling",
    )
    right.set(ylabel="tokens/s", title="Single-stream decode")
    right.tick_params(axis="x", labelrotation=20)
    right.legend()
    fig.suptitle(f"{rep['model']['name']} on {rep['machine']['name']} ({rep['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rep: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(rep, indent=2))
    paths[1].write_text(markdown(rep))
    plot(rep, paths[2])
    return paths
