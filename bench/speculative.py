"""Speculative decoding: decode speed with and without it, next to what the cost model predicts.

    python -m bench.speculative [--rounds 5] [--prompts 6] [--targets Q4_1,F16]
                                [--drafts Q4_0,Q2_K] [--kv q8_0] [--json PATH]

Targets and drafts are the default model (SmolLM2-135M Q4_1) and builds derived from it with
``llama_model_quantize`` (cached under ~/.cache/codeserve/derived): F16 is the same weights at
16 bits, where a batch of tokens costs little more than one; Q4_0/Q2_K are cheaper drafts cut
from the target itself. Each target runs in-process in codeserve's own engine (``LlamaEngine``),
greedy, with modes interleaved per prompt and round so load drifts hit all of them alike:

* ``rewrite``: a HumanEval function plus "the same code with `f` renamed to `f_v2`:", where the
  answer copies most of its prompt (what prompt lookup is for);
* ``humaneval``: HumanEval prompts completed from scratch, where copying rarely helps.

Per workload and mode: decode tokens/s (median over rounds of Σtokens/Σdecode time), the ratio
to ``off`` (median of per-round ratios), acceptance (accepted/drafted), tokens per target pass,
greedy identity with ``off``, and the speedup the cost model predicts from the passes actually
made, with the engine's calibrated costs (server/engine/costmodel.py), in target steps:

    predicted = Σ tokens / (Σ_passes verify(K+1) + draft · draft steps + draft_batch · tokens
                            the draft read in batches: the prompt, and tokens it did not propose)

``--fixed-k`` adds modes that draft exactly K every pass, which the adaptive controller would
not choose where they lose: they check the model where it predicts a slowdown.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.workloads import REWRITE_STOPS, STOPS, humaneval, rewrite_prompts


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def derived_gguf(src: Path, qtype: str, out_dir: Path | None = None) -> Path:
    """``src`` requantized to ``qtype`` (e.g. "Q4_0", "F16"), built once and cached."""
    import llama_cpp

    if src.stem.upper().endswith(qtype.upper()):
        return src
    if out_dir is None:
        from server.settings import StoreSettings

        out_dir = StoreSettings().cache_dir.parent / "derived"
    out = out_dir / f"{src.stem}-{qtype.upper()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.allow_requantize = True
    with _quiet_stderr():  # llama.cpp prints a line per tensor
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(tmp).encode(), ctypes.byref(params)
        )
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src} -> {qtype} failed ({rc})")
    tmp.rename(out)
    return out


@dataclass(frozen=True)
class Prompt:
    workload: str
    text: str
    max_tokens: int
    stop: tuple[str, ...]


def workloads(n: int, count_tokens) -> list[Prompt]:
    problems = humaneval()
    rewrites = [
        Prompt("rewrite", text, max_tokens, REWRITE_STOPS)
        for text, max_tokens in rewrite_prompts(n, count_tokens)
    ]
    completions = [
        Prompt("humaneval", p.prompt, 128, tuple(STOPS)) for p in problems[3 : 3 + 11 * n : 11]
    ]
    return rewrites + completions


@dataclass
class Tally:
    tokens: int = 0  # decode tokens: the first comes from the prompt pass
    decode_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    passes: int = 0  # decode passes
    sizes: list[int] = field(default_factory=list)
    draft_steps: int = 0
    draft_batched: int = 0
    same: int = 0
    runs: int = 0


def _engine(target: Path, kv: str, draft: Path | None):
    from server.engine.llama import LlamaEngine
    from server.registry import parse_registry

    models: dict = {"t": {"source": {"path": str(target)}, "n_ctx": 4096, "kv_cache": kv}}
    if draft is not None:
        models["t"]["draft"] = "d"
        models["d"] = {"source": {"path": str(draft)}, "kv_cache": kv}
    reg = parse_registry({"default_model": "t", "models": models}, Path("bench.toml"))
    extra = {"draft": (draft, reg.models["d"])} if draft is not None else {}
    return LlamaEngine(target, reg.models["t"], **extra)


@dataclass(frozen=True)
class Mode:
    engine: object
    mode: str
    fixed_k: int | None = None  # None: adaptive K up to the model's draft_max


def _run(m: Mode, prompt: list[int], p: Prompt):
    from server.engine.base import Delta, Finished, GenerationRequest, SamplingParams, Speculation

    req = GenerationRequest(
        prompt=prompt,
        max_tokens=p.max_tokens,
        sampling=SamplingParams(temperature=0.0),
        stop=p.stop,
        speculation=Speculation(mode=m.mode, max_draft=m.fixed_k),  # type: ignore[arg-type]
    )
    engine = m.engine
    cfg = engine.cfg  # type: ignore[attr-defined]
    if m.fixed_k is not None:  # the same engine, drafting exactly K every pass
        engine.cfg = cfg.model_copy(update={"draft_adaptive": False})  # type: ignore[attr-defined]
    tokens: list[int] = []
    fin = None
    try:
        for ev in engine.generate(req, lambda: False):  # type: ignore[attr-defined]
            if isinstance(ev, Delta):
                tokens.extend(ev.token_ids)
            elif isinstance(ev, Finished):
                fin = ev
    finally:
        engine.cfg = cfg  # type: ignore[attr-defined]
    assert fin is not None
    return tokens, fin.timings, engine.last_run  # type: ignore[attr-defined]


def bench_target(
    target: Path, drafts: list[Path], kv: str, rounds: int, n: int, fixed_k: int
) -> dict:
    mains = [_engine(target, kv, d) for d in drafts] or [_engine(target, kv, None)]
    modes: dict[str, Mode] = {
        "off": Mode(mains[0], "off"),
        "lookup": Mode(mains[0], "prompt_lookup"),
    }
    if fixed_k:
        modes[f"lookup K={fixed_k}"] = Mode(mains[0], "prompt_lookup", fixed_k)
    for i, (d, e) in enumerate(zip(drafts, mains, strict=False)):
        name = f"draft {d.stem.split('-')[-1]}"
        modes[name] = Mode(e, "draft")
        if fixed_k and i == 0:
            modes[f"{name} K={fixed_k}"] = Mode(e, "draft", fixed_k)
    prompts = workloads(n, lambda s: len(mains[0].tokenize(s, add_bos=False)))
    ids = [mains[0].tokenize(p.text, add_bos=True) for p in prompts]
    for m in modes.values():  # warm-up; the first speculative request calibrates
        _run(m, ids[0], prompts[0])
    tallies: dict[tuple[str, str, int], Tally] = {}
    names = list(modes)
    for r in range(rounds):
        for i, (p, prompt) in enumerate(zip(prompts, ids, strict=True)):
            k = (r + i) % len(names)
            outputs = {}
            for name in names[k:] + names[:k]:
                m = modes[name]
                tokens, t, run = _run(m, prompt, p)
                sizes = run.drafts
                outputs[name] = tokens
                tl = tallies.setdefault((p.workload, name, r), Tally())
                tl.tokens += max(t.completion_tokens - 1, 0)
                tl.decode_s += t.decode_ms / 1e3
                tl.drafted += t.drafted
                tl.accepted += t.accepted
                tl.passes += len(sizes) if m.mode != "off" else max(t.completion_tokens - 1, 0)
                tl.sizes += sizes
                tl.draft_steps += run.draft_steps
                tl.draft_batched += run.draft_batched
                tl.runs += 1
            for name, tokens in outputs.items():
                tallies[(p.workload, name, r)].same += tokens == outputs["off"]
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    costs = {
        name: m.engine._spec.costs.get(m.mode)  # type: ignore[attr-defined]
        for name, m in modes.items()
        if m.mode != "off"
    }
    rows = []
    for w in dict.fromkeys(p.workload for p in prompts):
        for name in names:
            per_round = [tallies[(w, name, r)] for r in range(rounds)]
            tps = [t.tokens / t.decode_s for t in per_round if t.decode_s > 0]
            base = [tallies[(w, "off", r)] for r in range(rounds)]
            ratios = [
                (t.tokens / t.decode_s) / (b.tokens / b.decode_s)
                for t, b in zip(per_round, base, strict=True)
                if t.decode_s > 0 and b.decode_s > 0
            ]
            tot = Tally()
            for t in per_round:
                tot.tokens += t.tokens
                tot.drafted += t.drafted
                tot.accepted += t.accepted
                tot.passes += t.passes
                tot.sizes += t.sizes
                tot.draft_steps += t.draft_steps
                tot.draft_batched += t.draft_batched
                tot.same += t.same
                tot.runs += t.runs
            cost = costs.get(name)
            predicted = None
            if cost is not None and tot.sizes:
                spent = (
                    sum(cost.verify_cost(k + 1) for k in tot.sizes)
                    + tot.draft_steps * cost.draft
                    + tot.draft_batched * cost.draft_batch
                )
                predicted = tot.tokens / spent
            rows.append(
                {
                    "workload": w,
                    "mode": name,
                    "decode_tps": statistics.median(tps) if tps else float("nan"),
                    "ratio": statistics.median(ratios) if ratios else float("nan"),
                    "ratio_runs": ratios,
                    "acceptance": tot.accepted / tot.drafted if tot.drafted else None,
                    "tokens_per_pass": tot.tokens / tot.passes if tot.passes else None,
                    "mean_k": statistics.mean(tot.sizes) if tot.sizes else 0.0,
                    "predicted": predicted if name != "off" else 1.0,
                    "identical": f"{tot.same}/{tot.runs}",
                }
            )
    for e in mains:
        e.close()
    return {
        "target": target.name,
        "kv_cache": kv,
        "exact": mains[0]._spec.exact,
        "costs": {
            name: {
                "step_ms": c.step_s * 1e3,
                "verify": c.verify,
                "draft": c.draft,
                "draft_batch": c.draft_batch,
            }
            for name, c in costs.items()
            if c is not None
        },
        "rows": rows,
    }


def markdown(rep: dict) -> str:
    out = []
    for t in rep["targets"]:
        exact = "bit-identical to single steps" if t["exact"] else "not batch-invariant"
        out.append(f"\n### target {t['target']} (kv {t['kv_cache']}; batched rows {exact})\n")
        for name, c in t["costs"].items():
            v = ", ".join(
                f"{n}: {x:.2f}" for n, x in sorted(c["verify"].items(), key=lambda i: int(i[0]))
            )
            out.append(
                f"- cost model ({name}): step {c['step_ms']:.1f} ms; verify(n)/step {{{v}}}; "
                f"draft/step {c['draft']:.2f} (batched {c['draft_batch']:.2f})"
            )
        out.append(
            "\n| workload | mode | decode tok/s | × off | predicted × | acceptance | tok/pass "
            "| mean K | identical |\n|---|---|---|---|---|---|---|---|---|"
        )
        for r in t["rows"]:
            acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
            tpp = f"{r['tokens_per_pass']:.2f}" if r["tokens_per_pass"] else "-"
            pred = f"{r['predicted']:.2f}" if r["predicted"] else "-"
            out.append(
                f"| {r['workload']} | {r['mode']} | {r['decode_tps']:.1f} | {r['ratio']:.2f} "
                f"| {pred} | {acc} | {tpp} | {r['mean_k']:.1f} | {r['identical']} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per workload")
    ap.add_argument("--targets", default="Q4_1,F16", help="the default model's file and builds")
    ap.add_argument("--drafts", default="Q4_0,Q2_K", help="drafts cut from the default model")
    ap.add_argument("--kv", default="q8_0", choices=["f16", "q8_0", "q4_0"])
    ap.add_argument(
        "--fixed-k",
        type=int,
        default=4,
        help="also run lookup and the first draft at this fixed K (checks the cost model where "
        "it predicts a loss); 0: skip",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from bench.harness import target as registry_target

    base = registry_target().path
    rep = {"rounds": args.rounds, "prompts": args.prompts, "targets": []}
    drafts = [derived_gguf(base, q) for q in args.drafts.split(",") if q]
    for q in (q for q in args.targets.split(",") if q):
        path = derived_gguf(base, q)
        print(f"target {path.name}: drafts {[d.name for d in drafts]}", file=sys.stderr)
        rep["targets"].append(
            bench_target(path, drafts, args.kv, args.rounds, args.prompts, args.fixed_k)
        )
        print(markdown({"targets": rep["targets"][-1:]}), flush=True)
        if args.json:  # after every target, so a long run keeps what it measured
            args.json.write_text(json.dumps(rep, indent=2, default=str))


if __name__ == "__main__":
    main()
