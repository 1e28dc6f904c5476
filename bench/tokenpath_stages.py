"""The per-token stages of bench.tokenpath, thread counters, and the report (JSON and Markdown)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from bench.harness import percentile, summary


class Stage(NamedTuple):
    key: str
    label: str
    thread: str
    start: str  # mark of token k; "+mark" is the mark of token k+1
    end: str


S = Stage
# From llama_decode returning to the client holding the frame; contiguous, so they add up to
# LATENCY_TOTAL.
LATENCY = [
    S(
        "after_decode",
        "llama_decode returned → sampling starts",
        "decode",
        "decode_end",
        "sample_start",
    ),
    S(
        "sample",
        "sampling (argmax when greedy, else llama_sampler_sample)",
        "decode",
        "sample_start",
        "sample_end",
    ),
    S(
        "release",
        "detokenize + text release (piece, TextReleaser)",
        "decode",
        "sample_end",
        "release_end",
    ),
    S("emit", "Delta built, sink called", "decode", "release_end", "emit_start"),
    S(
        "handoff",
        "hand-off: call_soon_threadsafe → _deliver runs",
        "loop",
        "emit_start",
        "delivered",
    ),
    S(
        "scheduler",
        "scheduler queue → dialect (ModelWorker, relay)",
        "loop",
        "delivered",
        "dialect_got",
    ),
    S("chunk", "chunk building (completions._chunks)", "loop", "dialect_got", "chunk_built"),
    S("json", "JSON encoding (json.dumps)", "loop", "chunk_built", "json_end"),
    S("sse", "SSE framing (sse-starlette)", "loop", "json_end", "sse_send"),
    S("middleware", "ASGI middleware stack", "loop", "sse_send", "asgi_send"),
    S("http", "uvicorn HTTP/1.1 framing (httptools or h11)", "loop", "asgi_send", "wire"),
    S("receipt", "socket write → client has the frame", "client", "wire", "client"),
]
LATENCY_TOTAL = S(
    "latency", "llama_decode returned → frame at the client", "", "decode_end", "client"
)

# The decode thread's work for token k, from its llama_decode to the next. Adds up to STEP_TOTAL.
STEP = [
    S("decode", "decode (llama_decode)", "decode", "decode_start", "decode_end"),
    *LATENCY[:4],
    S("sink", "sink: call_soon_threadsafe", "decode", "emit_start", "emit_end"),
    S(
        "next_step",
        "rest of the step, to the next llama_decode (with the wait below)",
        "decode",
        "emit_end",
        "+decode_start",
    ),
]
STEP_TOTAL = S(
    "step", "decode thread step (llama_decode to llama_decode)", "", "decode_start", "+decode_start"
)

# Not on the chain: the event loop's work per token, and the send syscall within it.
LOOP = [
    S(
        "loop_busy",
        "event loop busy per token (_deliver → uvicorn's send returned)",
        "loop",
        "delivered",
        "asgi_sent",
    ),
    S("syscall", "of which transport.write (the send syscall)", "loop", "wire", "written"),
]
# The decode thread's wait for the event loop to take a token's frame before the next step
# (EventSink.wait_taken), inside "rest of the step" (no wait when llama.cpp runs fewer threads
# than there are cores); then, for frames the wait saw taken, how long before the next
# llama_decode the frame had left: positive, it never shares the cores with a step.
HANDOVER = [
    S(
        "wait",
        "of which: waiting for the loop to take the frame",
        "decode",
        "wait_start",
        "wait_end",
    ),
    S(
        "sent_ahead",
        "frame sent (uvicorn's send returned) → next llama_decode",
        "loop",
        "asgi_sent",
        "+decode_start",
    ),
]
ROUND_FIGURES = ("decode", "step", "client_iti", "latency", "loop_busy")


def _at(marks: dict[str, dict[int, int]], name: str, k: int) -> int | None:
    if name.startswith("+"):
        return marks.get(name[1:], {}).get(k + 1)
    return marks.get(name, {}).get(k)


def per_token(marks: dict[str, dict[int, int]], tokens: list[int]) -> list[dict[str, float]]:
    """Each token's stage durations in µs (token 0, whose decode was the prompt's, is left out)."""
    rows = []
    for k in tokens:
        if k == 0:
            continue
        row: dict[str, float] = {}
        for s in [*LATENCY, *STEP, LATENCY_TOTAL, STEP_TOTAL, *LOOP, *HANDOVER]:
            ta, tb = _at(marks, s.start, k), _at(marks, s.end, k)
            if s.key == "sent_ahead" and _at(marks, "taken", k) is None:
                continue
            if ta is not None and tb is not None:
                row[s.key] = (tb - ta) / 1e3
        prev, this = _at(marks, "client", k - 1), _at(marks, "client", k)
        if prev is not None and this is not None:
            row["client_iti"] = (this - prev) / 1e3
        rows.append(row)
    return rows


# -- threads -------------------------------------------------------------------------------------

THREAD_GROUPS = [
    "decode thread (+ llama.cpp's first worker)",
    "llama.cpp worker threads",
    "event loop (uvicorn)",
    "other Python threads",
    "bench driver (waits)",
    "client process",
]
Counters = dict[str, dict[int, list[int]]]  # group → thread id → [ticks, voluntary, involuntary]


def thread_counters(pid: int | str = "self") -> dict[int, tuple[int, int, int]]:
    """Per thread: CPU clock ticks (user + system), voluntary and involuntary context switches."""
    out = {}
    base = Path(f"/proc/{pid}/task")
    for task in base.iterdir() if base.is_dir() else ():
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        switches = dict(
            line.split(":\t") for line in status.splitlines() if "ctxt_switches" in line
        )
        out[int(task.name)] = (
            int(stat[11]) + int(stat[12]),
            int(switches.get("voluntary_ctxt_switches", 0)),
            int(switches.get("nonvoluntary_ctxt_switches", 0)),
        )
    return out


def counter_delta(
    before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]]
) -> dict[int, tuple[int, int, int]]:
    zero = (0, 0, 0)
    return {
        tid: (v[0] - b[0], v[1] - b[1], v[2] - b[2])
        for tid, v in after.items()
        for b in [before.get(tid, zero)]
    }


def add_counters(groups: Counters, group: str, tid: int, v: tuple[int, int, int]) -> None:
    acc = groups.setdefault(group, {}).setdefault(tid, [0, 0, 0])
    for i, x in enumerate(v):
        acc[i] += x


def thread_table(groups: Counters, tokens: int) -> dict[str, dict[str, float]]:
    """Per group of threads: CPU µs, voluntary and involuntary switches per token."""
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    out = {}
    for group in [g for g in THREAD_GROUPS if g in groups]:
        rows = list(groups[group].values())
        cpu, vol, invol = (sum(r[i] for r in rows) for i in range(3))
        out[group] = {
            "threads": len(rows),
            "cpu_us_per_token": cpu * tick_us / tokens,
            "voluntary_per_token": vol / tokens,
            "involuntary_per_token": invol / tokens,
        }
    return out


# -- one variant's report ------------------------------------------------------------------------


class Accumulated:
    """What the rounds of one variant measured."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.per_round: dict[str, list[float]] = {k: [] for k in ROUND_FIGURES}
        self.groups: Counters = {}
        self.streamed = 0

    def add_round(self, rows: list[dict[str, float]], streamed: int) -> None:
        self.rows += rows
        self.streamed += streamed
        for key in ROUND_FIGURES:
            self.per_round[key].append(percentile([r[key] for r in rows if key in r], 0.5))


def _stats(xs: list[float]) -> dict[str, float | int | None]:
    """Median and p90 of a stage's samples; None for a stage no token passed through (JSON has
    no NaN)."""
    if not xs:
        return {"median_us": None, "p90_us": None, "n": 0}
    return {"median_us": percentile(xs, 0.5), "p90_us": percentile(xs, 0.9), "n": len(xs)}


def report(acc: Accumulated) -> dict[str, Any]:
    def stages(defs: list[Stage]) -> dict[str, dict[str, Any]]:
        return {
            s.key: {
                "label": s.label,
                "thread": s.thread,
                **_stats([r[s.key] for r in acc.rows if s.key in r]),
            }
            for s in defs
        }

    pr = acc.per_round
    totals = {key: summary(xs) for key, xs in pr.items()}
    totals["tax"] = summary([i - d for i, d in zip(pr["client_iti"], pr["decode"], strict=True)])
    totals["client_tok_s"] = summary([1e6 / x for x in pr["client_iti"]])
    return {
        "latency_path": stages(LATENCY),
        "decode_step": stages(STEP),
        "event_loop": stages(LOOP),
        "handover": stages(HANDOVER),
        "per_token_totals": {
            s.key: _stats([r[s.key] for r in acc.rows if s.key in r])
            for s in (LATENCY_TOTAL, STEP_TOTAL)
        },
        "totals": totals,
        "threads": thread_table(acc.groups, max(acc.streamed, 1)),
    }


# -- Markdown ------------------------------------------------------------------------------------


def _span(s: dict[str, Any], digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


TOTAL_ROWS = [
    ("decode", "llama_decode, µs", 0),
    ("step", "decode thread step, µs", 0),
    ("client_iti", "client inter-token interval, µs", 0),
    ("tax", "**per-token tax** (client interval − llama_decode), µs", 0),
    ("client_tok_s", "tokens/s at the client", 1),
    ("latency", "llama_decode returned → frame at client, µs", 0),
    ("loop_busy", "event loop busy per token, µs", 0),
]


def markdown(rep: dict[str, Any]) -> str:
    m, model, plan = rep["machine"], rep["model"], rep["plan"]
    variants: dict[str, dict[str, Any]] = rep["variants"]
    names = list(variants)
    load = plan["contention"]
    head = " | ".join(f"{v} median | {v} p90" for v in names)
    bar = "---:|---:|" * len(names)

    def us(section: str, key: str) -> str:
        cells = (variants[v][section][key] for v in names)
        return " | ".join(
            f"{c['median_us']:.0f} | {c['p90_us']:.0f}" if c["n"] else "– | –" for c in cells
        )

    lines = [
        f"### Per-token path: {model['name']} ({model['file']}, {model['engine']}) on "
        f"{m['name']} — {rep['date']}",
        "",
        f"{m['cpu']}, {m['cpus']} CPUs; {model['threads']} llama.cpp threads, KV "
        f"{model['kv_cache']}; one greedy stream of {plan['tokens']} tokens, {plan['rounds']} "
        "rounds"
        + (" per variant, interleaved" if len(names) > 1 else "")
        + (f", {load} busy-loop process{'es' if load != 1 else ''} running" if load else "")
        + f". µs per token (tokens 1..n-1 of every round). `{rep['command']}`",
        "",
        f"| llama_decode returns → frame at client | thread | {head} |",
        f"|---|---|{bar}",
        *(f"| {s.label} | {s.thread} | {us('latency_path', s.key)} |" for s in LATENCY),
        f"| **{LATENCY_TOTAL.label}** | | {us('per_token_totals', 'latency')} |",
        *(f"| {s.label} | loop | {us('event_loop', s.key)} |" for s in LOOP),
        "",
        f"| decode thread, per token | {head} |",
        f"|---|{bar}",
        *(f"| {s.label} | {us('decode_step', s.key)} |" for s in STEP),
        *(f"| {s.label} | {us('handover', s.key)} |" for s in HANDOVER),
        f"| **{STEP_TOTAL.label}** | {us('per_token_totals', 'step')} |",
        "",
        "| per round (median over its tokens): median (min–max) of rounds | "
        + " | ".join(names)
        + " |",
        "|---|" + "---:|" * len(names),
        *(
            f"| {label} | " + " | ".join(_span(variants[v]["totals"][key], d) for v in names) + " |"
            for key, label, d in TOTAL_ROWS
        ),
        "",
        "| threads, per token: CPU µs / woken (voluntary switches) / preempted | "
        + " | ".join(names)
        + " |",
        "|---|" + "---:|" * len(names),
    ]
    for group in THREAD_GROUPS:
        cells = []
        for v in names:
            g = variants[v]["threads"].get(group)
            cells.append(
                f"{g['cpu_us_per_token']:.0f} / {g['voluntary_per_token']:.2f} / "
                f"{g['involuntary_per_token']:.2f}"
                if g
                else "–"
            )
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += ["", "CPU time comes from /proc in clock ticks: small per-token figures are coarse."]
    return "\n".join(lines) + "\n"
