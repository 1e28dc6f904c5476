"""What cells interleaved by sequences decoding together cost, and what packing them gives back.

    python -m bench.kv_interleave [--gguf PATH] [--requests 16] [--rounds 3]

The suite's eight-stream workload at the level of llama.cpp steps: eight slots of one
``BatchContext`` (the batched engine's: 8 sequences × 8192 cells, q8_0 KV, flash attention), each
running requests of a short prompt (20-29 tokens) and 128-147 decoded tokens, the next request
taking the slot as the last one ends, until ``--requests`` have run. Sequences decoding together
get their new cells side by side, one each per step. Two contexts run the same requests, a step
of one after a step of the other (so the machine's noise falls on both alike): one as they come,
one packed by the engine's own ``SlotCaches`` under its own rule (``note_step``,
``interleaved``, ``pack``). Reported per round: the time spent in ``llama_decode`` by each, and
the packing's own time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

_SLOTS = 8


class _Workload:
    """Eight slots running requests back to back in one context; steps timed one by one."""

    def __init__(self, ctx: Any, caches: Any, slots: list[Any], requests: int):
        self.ctx, self.caches, self.slots = ctx, caches, slots
        self.left = [0] * _SLOTS
        self.started = 0
        self.requests = requests
        self.decode_s = 0.0
        self.pack_s = 0.0

    def step(self) -> bool:
        entries: list[tuple[int, int, int, bool]] = []
        decoding = 0
        for s, slot in enumerate(self.slots):
            if self.left[s] == 0:
                if self.started >= self.requests:
                    slot.busy = False
                    continue
                self.ctx.seq_rm(s, -1, -1)
                self.started += 1
                n = 20 + (3 * s + self.started) % 10
                slot.tokens = [_token(self.started, i) for i in range(n)]
                entries += [(t, i, s, i == n - 1) for i, t in enumerate(slot.tokens)]
                slot.busy = True
                self.left[s] = 128 + (7 * s) % 20
                continue
            tok = _token(s, len(slot.tokens))
            entries.append((tok, len(slot.tokens), s, True))
            slot.tokens.append(tok)
            self.left[s] -= 1
            decoding += 1
        if not entries:
            return False
        t0 = time.perf_counter()
        self.ctx.decode(entries)
        self.decode_s += time.perf_counter() - t0
        if self.caches is not None:
            self.caches.note_step(decoding, decoding)
            if self.caches.interleaved():
                t0 = time.perf_counter()
                self.caches.pack()
                self.pack_s += time.perf_counter() - t0
        return True


def _token(seq: int, i: int) -> int:
    return (1000 + 37 * seq + 13 * i) % 40000 + 100


def measure(path: Path, requests: int, rounds: int) -> list[dict[str, float]]:
    from bench.harness import engine_context
    from server.engine.batch_state import Slot
    from server.engine.model import Model
    from server.engine.prompt_cache import PromptCache
    from server.engine.slot_cache import SlotCaches
    from server.registry import load_registry
    from server.settings import StoreSettings

    cfg = load_registry(StoreSettings().models_file).default
    model = Model.load(path, cfg)

    def workload(packed: bool) -> _Workload:
        ctx = engine_context(model, n_seq=_SLOTS)
        slots = [Slot(i) for i in range(_SLOTS)]
        caches = SlotCaches(ctx, model, slots, PromptCache(0), 512) if packed else None
        return _Workload(ctx, caches, slots, requests)

    out = []
    for r in range(rounds):
        plain, packed = workload(False), workload(True)
        going = True
        while going:
            going = plain.step() | packed.step()
        row = {
            "plain_decode_s": plain.decode_s,
            "packed_decode_s": packed.decode_s,
            "packing_s": packed.pack_s,
            "packs": float(packed.caches.packs),
        }
        row["ratio"] = (row["packed_decode_s"] + row["packing_s"]) / row["plain_decode_s"]
        print(f"  round {r + 1}: done", flush=True)
        out.append(row)
        plain.ctx.close()
        packed.ctx.close()
    model.close()
    return out


def markdown(rows: list[dict[str, float]], requests: int) -> str:
    lines = [
        f"{requests} requests on 8 slots (prompt 20-29 tokens, 128-147 decoded), contexts "
        "stepping alternately; seconds in llama_decode:",
        "",
        "| round | as they come | packed | packing | packs | packed + packing / as they come |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['plain_decode_s']:.2f} | {r['packed_decode_s']:.2f} | "
            f"{r['packing_s']:.2f} | {r['packs']:.0f} | {r['ratio']:.3f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from bench.harness import target

    ap = argparse.ArgumentParser(prog="python -m bench.kv_interleave")
    ap.add_argument("--gguf", type=Path, help="default: the default model's file")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    path = args.gguf or target().path
    print(f"{path.name}:")
    print(markdown(measure(path, args.requests, args.rounds), args.requests))


if __name__ == "__main__":
    main()
