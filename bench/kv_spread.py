"""What idle cells high in the shared KV buffer cost a lone sequence, and what packing gives back.

    python -m bench.kv_spread [--gguf PATH] [--fill 4096,16384] [--rounds 6]

1. One ``BatchContext`` (the batched engine's: 8 sequences × 8192 cells, q8_0 KV, flash
   attention): a 300-token sequence steps 1, 2, 3, 5 and 9 tokens (the verify sizes of
   speculation; the cells go again after each, as rejected drafts do), with the buffer compact,
   then with 16 cells of another sequence left at cell ``fill`` (a long sequence evaluated below
   them and removed), then compact again. llama.cpp's attention spans every cell up to the
   highest one in use.
2. A ``BatchedEngine`` in this process: a burst of eight streams, one short request (which moves
   the idle caches beyond the budget to host RAM), a rest, then three lone 128-token decodes;
   rounds alternate between the engine as it is (it packs its idle caches during the rest) and
   packing turned off.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

_VERIFY = (1, 2, 3, 5, 9)


def spread_costs(path: Path, fills: list[int], reps: int = 5) -> list[tuple[str, dict[int, float]]]:
    from bench.harness import engine_context
    from server.engine.model import Model
    from server.registry import load_registry
    from server.settings import StoreSettings

    cfg = load_registry(StoreSettings().models_file).default
    model = Model.load(path, cfg)
    ctx = engine_context(model)
    prompt = 300
    ctx.decode([(100 + i % 50, i, 0, i == prompt - 1) for i in range(prompt)])

    def costs() -> dict[int, float]:
        times: dict[int, list[float]] = {n: [] for n in _VERIFY}
        for _ in range(reps):
            for n in _VERIFY:
                t0 = time.perf_counter()
                ctx.decode([(200, prompt + i, 0, True) for i in range(n)])
                times[n].append(time.perf_counter() - t0)
                ctx.seq_rm(0, prompt, -1)
        return {n: statistics.median(t) * 1e3 for n, t in times.items()}

    rows = [("compact", costs())]
    for fill in fills:
        for s in range(0, fill, 512):
            ctx.decode([(100 + (s + i) % 50, s + i, 1, False) for i in range(min(512, fill - s))])
        ctx.decode([(100 + i, i, 2, False) for i in range(16)])
        ctx.seq_rm(1, -1, -1)
        rows.append((f"16 idle cells at {fill}", costs()))
        ctx.seq_rm(2, -1, -1)
        rows.append(("compact again", costs()))
    ctx.close()
    model.close()
    return rows


def after_burst(path: Path, rounds: int) -> dict[str, list[float]]:
    from bench.workloads import humaneval
    from server.engine.base import CallbackSink, Delta, End, GenerationRequest, SamplingParams
    from server.engine.batched import BatchedEngine
    from server.engine.model import Model
    from server.registry import load_registry
    from server.settings import StoreSettings

    cfg = load_registry(StoreSettings().models_file).default
    engine = BatchedEngine(Model.load(path, cfg), slots=8)
    caches = engine._caches
    spread = caches.spread
    problems = humaneval()

    def submit(prompt: str, n: int) -> tuple[threading.Event, dict]:
        done, st = threading.Event(), {"n": 0}

        def sink(ev: object) -> None:
            if isinstance(ev, Delta):
                st.setdefault("first", time.perf_counter())
                st["n"] += len(ev.token_ids)
            if isinstance(ev, End):
                st["end"] = time.perf_counter()
                done.set()

        req = GenerationRequest(
            engine.tokenize(prompt, add_bos=True),
            n,
            sampling=SamplingParams(temperature=0),
            ignore_eos=True,
        )
        engine.submit(req, CallbackSink(sink))
        return done, st

    out: dict[str, list[float]] = {"packed": [], "not packed": []}
    k = 0
    for r in range(rounds):
        for mode in ("packed", "not packed") if r % 2 == 0 else ("not packed", "packed"):
            caches.spread = spread if mode == "packed" else (lambda: False)  # type: ignore[method-assign]
            burst = [
                submit(problems[(k + i) % len(problems)].prompt + f"# {k}-{i}\n" * 30, 96)
                for i in range(8)
            ]
            for done, _ in burst:
                done.wait()
            done, _ = submit(problems[k % len(problems)].prompt + f"# settle {k}\n", 8)
            done.wait()
            time.sleep(0.3)  # the engine packs here, if it does
            lone = []
            for j in range(3):
                done, st = submit(problems[(k + j) % len(problems)].prompt + f"# {k}.{j}\n", 128)
                done.wait()
                lone.append((st["n"] - 1) / (st["end"] - st["first"]))
            k += 8
            out[mode].append(statistics.median(lone))
    engine.close()
    return out


def main(argv: list[str] | None = None) -> None:
    from bench.harness import target

    ap = argparse.ArgumentParser(prog="python -m bench.kv_spread")
    ap.add_argument("--gguf", type=Path, help="default: the default model's file")
    ap.add_argument("--fill", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    path = args.gguf or target().path
    print(f"{path.name}: one sequence's step of n tokens, ms (and relative to n = 1)\n")
    print("| buffer | " + " | ".join(f"n = {n}" for n in _VERIFY) + " |")
    print("|---|" + "---:|" * len(_VERIFY))
    for name, ms in spread_costs(path, [int(f) for f in args.fill.split(",")]):
        cells = " | ".join(f"{ms[n]:.2f} ({ms[n] / ms[1]:.2f})" for n in _VERIFY)
        print(f"| {name} | {cells} |")
    if args.rounds:
        res = after_burst(path, args.rounds)
        print("\nLone decode after a burst of eight streams, tokens/s per round (median of 3):\n")
        for mode, v in res.items():
            print(f"- {mode}: {statistics.median(v):.1f} ({' '.join(f'{x:.1f}' for x in v)})")


if __name__ == "__main__":
    main()
