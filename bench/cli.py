"""`codeserve bench` and `codeserve bench humaneval`: parse flags, run, write results."""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from bench import machine, report
from bench.harness import codeserve, find_llama_server, target
from bench.suite import PEERS, Plan, run_suite

RESULTS = Path(__file__).resolve().parent / "results"


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure codeserve against raw llama.cpp and peer servers")
    b.add_argument(
        "--quick",
        action="store_true",
        help="a one-minute smoke run (codeserve and raw only, one round)",
    )
    b.add_argument("--model", help="registry model to measure (default: the default model)")
    b.add_argument(
        "--gguf",
        type=Path,
        help="measure this GGUF file instead, with the model's settings (e.g. an F16 build)",
    )
    b.add_argument("--peers", help=f"comma list from {','.join(PEERS)} (default: all available)")
    b.add_argument("--llama-server", help="path to llama.cpp's llama-server binary")
    b.add_argument("--rounds", type=int, help="rounds of one-stream requests (default 3)")
    b.add_argument("--concurrency-rounds", type=int, help="rounds of concurrent runs (default 6)")
    b.add_argument(
        "--kv-types",
        help="extra codeserve variants with these KV cache types ('' for none; default: the "
        "types other than the model's)",
    )
    b.add_argument(
        "--no-speculation",
        action="store_true",
        help="skip the prompt-lookup speculation variant",
    )
    b.add_argument("--quant-dir", type=Path, help="also measure every *.gguf in this directory")
    b.add_argument(
        "--contend",
        type=int,
        default=0,
        metavar="N",
        help="contended variant: run N busy-loop processes through the whole measurement, the "
        "same load for every peer; measures single-stream figures and 1 and 8 streams only",
    )
    b.add_argument("--out", type=Path, help=f"results directory (default {RESULTS})")
    b.set_defaults(func=cmd_suite)
    bs = b.add_subparsers(dest="bench_command")
    h = bs.add_parser("humaneval", help="pass@k on HumanEval through codeserve's API")
    h.add_argument("--models", help="comma list of registry models (default: the default model)")
    h.add_argument("--n", type=int, default=1, help="samples per problem")
    h.add_argument("--k", default="1", help="comma list of k for pass@k (k <= n)")
    h.add_argument("--limit", type=int, help="only the first N problems")
    h.add_argument("--temperature", type=float)
    h.add_argument("--url", help="use a running codeserve instead of starting one")
    h.add_argument("--out", type=Path)
    h.set_defaults(func=cmd_humaneval)


def _available_peers(llama_server: str | None) -> list[str]:
    peers = ["codeserve", "codeserve-simple", "raw"]
    if importlib.util.find_spec("starlette_context"):
        peers.append("llama-cpp-python")
    if llama_server:
        peers.append("llama-server")
    return peers


def cmd_suite(args: argparse.Namespace) -> None:
    t = target(args.model, args.gguf)
    binary = find_llama_server(args.llama_server)
    peers = (
        args.peers.split(",")
        if args.peers
        else (["codeserve", "raw"] if args.quick else _available_peers(binary))
    )
    plan = Plan.contended(args.contend) if args.contend else Plan()
    if args.quick:
        plan = Plan.quick()
    plan.contention = args.contend
    if args.rounds:
        plan.rounds = args.rounds
    if args.concurrency_rounds:
        plan.concurrency_rounds = args.concurrency_rounds
    variants: dict[str, dict] = {}
    if not args.quick:
        kv_types = args.kv_types
        if kv_types is None:
            kv_types = ",".join(k for k in ("f16", "q8_0", "q4_0") if k != t.kv_cache)
        for kv in filter(None, kv_types.split(",")):
            variants[f"{t.name}@kv-{kv}"] = {"kv_cache": kv}
        if not args.no_speculation:
            variants[f"{t.name}@prompt-lookup"] = {"speculative": "prompt_lookup"}
        for gguf in sorted(args.quant_dir.glob("*.gguf")) if args.quant_dir else []:
            variants[gguf.stem] = {"path": str(gguf)}
    missing = [p for p in peers if p == "llama-server" and not binary]
    if missing:
        raise SystemExit("llama-server not found: pass --llama-server PATH or set LLAMA_SERVER")
    print(f"bench: {t.name} ({t.path.name}), peers {', '.join(peers)}", file=sys.stderr)
    # A run that is stopped (kill, a timeout) still stops the servers and busy loops it started:
    # left running, they would load the machine under whatever is measured next.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rep = run_suite(t, peers, plan, binary, variants)
    out = args.out or (Path(tempfile.gettempdir()) / "codeserve-bench" if args.quick else RESULTS)
    stem = f"{time.strftime('%Y-%m-%d')}-{machine.machine_name()}"
    if args.model or args.gguf:  # the default model's results keep the plain name
        stem += f"-{t.name}"
    if args.contend:
        stem += f"-contended{args.contend}"
    for path in report.write(rep, out, stem):
        print(f"wrote {path}")
    print(report.markdown(rep))


def cmd_humaneval(args: argparse.Namespace) -> None:
    from bench.humaneval import evaluate
    from server.registry import load_registry
    from server.settings import StoreSettings

    registry = load_registry(StoreSettings().models_file)
    models = args.models.split(",") if args.models else [registry.default_model]
    ks = tuple(int(k) for k in args.k.split(","))
    with nullcontext(args.url) if args.url else codeserve() as url:
        runs = [
            evaluate(url, m, n=args.n, ks=ks, limit=args.limit, temperature=args.temperature)
            for m in models
        ]
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y-%m-%d')}-{machine.machine_name()}-humaneval.json"
    path.write_text(json.dumps({"machine": machine.describe(), "runs": runs}, indent=2))
    print("| model | problems | samples | " + " | ".join(runs[0]["pass_at"]) + " |")
    print("|---|---|---|" + "---|" * len(runs[0]["pass_at"]))
    for r in runs:
        print(
            f"| {r['model']} | {r['problems']} | {r['samples_per_problem']} | "
            + " | ".join(f"{v * 100:.1f}%" for v in r["pass_at"].values())
            + " |"
        )
    print(f"wrote {path}")
