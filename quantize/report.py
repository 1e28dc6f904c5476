"""The ladder's report: ``report.md`` for people, ``report.json`` for tools, ``report.png`` to see
the trade-off (size and decode speed against KL divergence)."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from quantize.ladder import REFERENCE, Rung, available_cores
from quantize.quality import Quality


@dataclass(frozen=True)
class Provenance:
    source: Path
    source_type: str
    # How the F16 reference came to be: "converted from a Hugging Face checkpoint",
    # "rebuilt from Q4_1 ...", "the source itself", ...
    reference: str
    rebuilt_from: str | None
    requantized: bool  # --force: rungs quantized straight from a quantized source


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def to_dict(
    title: str,
    prov: Provenance,
    rungs: list[Rung],
    quality: list[Quality],
    meta: dict,
    wall_s: float,
) -> dict:
    import gguf
    import llama_cpp

    rows = []
    for rung, q in zip(rungs, quality, strict=True):
        row = {"type": rung.type, "file": rung.path.name, "size_bytes": rung.size_bytes}
        row |= {k: v for k, v in asdict(q).items() if k != "type"}
        row |= {"quantize_s": rung.seconds, "fallback_tensors": rung.fallback}
        rows.append(row)
    return {
        "model": title,
        "source": {**asdict(prov), "source": str(prov.source)},
        "evaluation": meta,
        "rungs": rows,
        "wall_s": wall_s,
        "machine": {
            "platform": platform.platform(),
            "cores": available_cores(),
            "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        },
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def markdown(report: dict) -> str:
    ev, src = report["evaluation"], report["source"]
    rows = report["rungs"]
    ref_ppl = next(r["ppl"] for r in rows if r["type"] == REFERENCE)
    lines = [
        f"# Quantization ladder: {report['model']}",
        "",
        f"- Source: `{src['source']}` ({src['source_type']}).",
        f"- Reference: {src['reference']}.",
    ]
    if src["rebuilt_from"]:
        lines.append(
            f"- **The F16 is rebuilt from {src['rebuilt_from']}**, not the original weights: it "
            f"carries {src['rebuilt_from']}'s rounding, so KLD measures each rung against that "
            f"model, and rungs at or above {src['rebuilt_from']}'s precision lose almost nothing."
        )
    if src["requantized"]:
        lines.append(
            "- **Rungs were quantized straight from a quantized source (--force)**: each one "
            "carries both roundings."
        )
    lines += [
        f"- Corpus: {ev['corpus_description']}; {ev['windows']} window(s) of {ev['ctx']} "
        f"tokens ({ev['tokens']} tokens), logits at every position.",
        "- PPL: perplexity on that corpus. KLD: KL(F16 ‖ rung) in nats per token, mean and 99th "
        "percentile over positions. Top-1: positions where the rung's likeliest next token is "
        "F16's.",
        f"- Speed: greedy decode of {ev['speed_tokens']} tokens after a short prompt, median of "
        f"{ev['speed_runs']} run(s), {ev['threads']} thread(s); load: `Llama()` construction "
        "with the file in the page cache.",
        f"- Machine: {report['machine']['platform']}, {report['machine']['cores']} cores, "
        "llama-cpp-python "
        f"{report['machine']['llama_cpp_python']}. Wall time: {report['wall_s']:.0f} s.",
        "",
        "| Type | Size (MiB) | BPW | PPL | ΔPPL | KLD mean | KLD p99 | Top-1 | Load (s) "
        "| Decode (tok/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = (r["ppl"] / ref_ppl - 1) * 100
        lines.append(
            f"| {r['type']} | {r['size_bytes'] / 2**20:.1f} | {r['bpw']:.2f} | {r['ppl']:.3f} "
            f"| {delta:+.1f}% | {r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {r['top1']:.1%} "
            f"| {r['load_s']:.2f} | {r['decode_tps']:.1f} |"
        )
    fallbacks = [r for r in rows if r["fallback_tensors"]]
    if fallbacks:
        lines += [
            "",
            "Fallbacks: llama.cpp stored some tensors of these rungs in another type because "
            "their row length is not a multiple of the type's block size, so these rungs are "
            "partly other types than their names say: "
            + "; ".join(f"{r['type']} {r['fallback_tensors']}" for r in fallbacks)
            + " tensors.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    rows = report["rungs"]
    ref = next(r for r in rows if r["type"] == REFERENCE)
    quants = [r for r in rows if r["type"] != REFERENCE]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label, scale in (
        (axes[0], "size_bytes", "file size (MiB)", 2**20),
        (axes[1], "decode_tps", "decode (tokens/s)", 1),
    ):
        xs = [max(r["kld_mean"], 1e-6) for r in quants]  # log axis: keep a zero KLD plottable
        ys = [r[key] / scale for r in quants]
        ax.scatter(xs, ys)
        for r, x, y in zip(quants, xs, ys, strict=True):
            ax.annotate(r["type"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        # F16's KLD is 0 by definition: drawn as a line, not a point on the log axis.
        ax.axhline(ref[key] / scale, linestyle="--", color="grey", linewidth=1)
        ax.annotate(
            REFERENCE, (0.01, ref[key] / scale), xycoords=("axes fraction", "data"), fontsize=8
        )
        ax.set_xscale("log")
        ax.set_xlabel("KL divergence vs F16 (nats/token, log)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{report['model']}: quantization ladder")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(out: Path, report: dict) -> dict[str, Path]:
    paths = {ext: out / f"report.{ext}" for ext in ("json", "md", "png")}
    _write(paths["json"], (json.dumps(report, indent=2) + "\n").encode())
    _write(paths["md"], markdown(report).encode())
    plot(report, paths["png"])
    return paths
