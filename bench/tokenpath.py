"""Where each token's time goes, from llama_decode to the SSE frame arriving at a client.

    python -m bench.tokenpath [--tokens 128] [--rounds 5] [--contend N] [--json PATH]
                              [--variant basehttp]

codeserve's own app (default settings and model, its default batched engine; one frame per
token, ``--stream-frame-ms 0``, so each frame's stages are one token's) runs under
uvicorn in this process, with the functions on one token's path wrapped at run time
(bench.tokenpath_probe). A client in a separate process streams greedy /v1/completions requests
over one persistent connection, one request at a time, and stamps each frame as it arrives; both
processes read the same monotonic clock, so a token's stages line up from the decode thread to the
client. The per-token tax is what the client sees between tokens beyond llama_decode itself.

Thread activity per token comes from /proc (CPU time in clock ticks, context switches): voluntary
switches are how often a thread went to sleep and was woken again.

``--variant NAME`` adds a variant of the serving stack, measured in the same process on the same
server, its requests interleaved round by round with the unchanged one's (see VARIANTS): on a
shared, noisy machine that is the comparison that holds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import multiprocessing
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import free_port
from bench.tokenpath_stages import (
    Accumulated,
    add_counters,
    counter_delta,
    markdown,
    per_token,
    report,
    thread_counters,
)

PROMPT = (
    "def parse_config(path):\n"
    '    """Read a key=value file into a dict, skipping comments and blank lines."""\n'
)

# -- the client, in its own process (its GIL and CPU are not the server's) ---------------------


def _client_main(url: str, pipe: Any) -> None:
    from bench.client import Connection

    conn = Connection(url)
    while (body := pipe.recv()) is not None:
        before = thread_counters()
        frames: list[int] = []
        sent = time.perf_counter_ns()
        for arrived, line in conn.lines("/v1/completions", body):
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if any(c.get("text") for c in event.get("choices", [])):
                    frames.append(int(arrived * 1e9))
        pipe.send(
            {"sent": sent, "frames": frames, "threads": counter_delta(before, thread_counters())}
        )
    conn.close()


# -- codeserve in this process -----------------------------------------------------------------


@dataclass
class Served:
    url: str
    worker: Any
    loop_tid: int


@contextmanager
def serve(probe: Any, model: str | None) -> Iterator[Served]:
    """codeserve's app with its default settings under uvicorn on a thread, the probe in; every
    token its own frame (``stream_frame_ms=0``), so a frame's stages are one token's."""
    from sse_starlette.sse import AppStatus

    from bench.client import Connection
    from bench.tokenpath_probe import OuterSend
    from server import serving
    from server.api.app import create_app
    from server.registry import load_registry
    from server.settings import ServerSettings

    settings = ServerSettings(
        host="127.0.0.1", port=free_port(), log_level="warning", stream_frame_ms=0
    )
    registry = load_registry(settings.models_file)
    app = create_app(settings, registry)
    server = serving.make_server(app, settings)
    server.config.app = OuterSend(app, probe, _variants(app))  # loaded when it serves
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        factory = server.config.get_loop_factory() or asyncio.new_event_loop

        def make() -> asyncio.AbstractEventLoop:
            loops.append(factory())
            return loops[-1]

        with asyncio.Runner(loop_factory=make) as runner:
            runner.run(server.serve())

    thread = threading.Thread(target=run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    conn = Connection(url, timeout=5)
    deadline = time.monotonic() + 300
    while True:
        try:
            if conn.request("GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("codeserve did not become healthy")
        time.sleep(0.2)
    conn.close()
    name = model or registry.default_model
    worker = asyncio.run_coroutine_threadsafe(app.state.manager.get(name), loops[0]).result()
    try:
        assert thread.native_id is not None
        yield Served(url, worker, thread.native_id)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        # The draining shutdown tells sse-starlette, process-wide, to cut every stream; other
        # servers in this process (a test session's) must keep streaming.
        AppStatus.should_exit = False


# -- variants of the serving stack, for before/after comparisons in one process ----------------

VARIANTS = {
    "basehttp": "a pass-through BaseHTTPMiddleware around the app, as the request counter was "
    "before it became pure ASGI (server/api/request_count.py)",
    "nowait": "the decode thread starts its next step without waiting for the event loop to "
    "take the last token's frame (EventSink.wait_taken answers at once)",
}


def _variants(app: Any) -> dict[str, Any]:
    from starlette.middleware.base import BaseHTTPMiddleware

    async def passthrough(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    return {"basehttp": BaseHTTPMiddleware(app, dispatch=passthrough), "nowait": app}


# -- a run ---------------------------------------------------------------------------------------


def run(
    tokens: int = 128,
    rounds: int = 5,
    contend: int = 0,
    model: str | None = None,
    variants: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Measure `rounds` requests of `tokens` tokens per variant ("served" is the stack as is)."""
    from bench import machine
    from bench.contention import busy_load
    from bench.tokenpath_probe import Probe, install

    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    names = ["served", *variants]
    probe = Probe()
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    acc = {v: Accumulated() for v in names}
    with serve(probe, model) as srv:
        installed = install(probe, srv.worker)
        engine = srv.worker.engine
        client = ctx.Process(target=_client_main, args=(srv.url, theirs), daemon=True)
        client.start()
        body = {
            "model": srv.worker.name,
            "prompt": PROMPT,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,  # every round streams exactly `tokens` tokens
            "stream": True,
        }
        # Every request ends its prompt with a line of its own, so its first token comes from a
        # step as the others do: a prompt sent again would start from the logits kept after it.
        sent = itertools.count()

        def fresh() -> dict[str, Any]:
            return {**body, "prompt": f"{PROMPT}    # {next(sent)}\n"}

        try:
            for v in names:  # warm-up: the prompt's cache, the connection, every code path
                probe.variant = v
                mine.send(fresh())
                mine.recv()
            with busy_load(contend):
                for r in range(rounds):
                    for v in names[r % len(names) :] + names[: r % len(names)]:  # rotating
                        probe.variant = v
                        _round(probe, mine, fresh(), srv, acc[v])
        finally:
            mine.send(None)
            client.join(timeout=30)
            installed.uninstall()
        cfg = engine.model.cfg
        threads = engine._ctx._lib.llama_n_threads(engine._ctx.ptr)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.tokenpath " + " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "model": {
            "name": cfg.name,
            "file": Path(engine.model.path).name,
            "engine": type(engine).__name__,
            "threads": threads,
            "n_ctx": cfg.n_ctx,
            "kv_cache": cfg.kv_cache,
        },
        "plan": {
            "tokens": tokens,
            "rounds": rounds,
            "contention": contend,
            "prompt": PROMPT,
            "variants": {v: VARIANTS.get(v, "the serving stack as it is") for v in names},
        },
        "variants": {v: report(a) for v, a in acc.items()},
        "_rows": {v: a.rows for v, a in acc.items()},  # per token, for tests; not in the JSON
    }


def _round(probe: Any, pipe: Any, body: dict[str, Any], srv: Served, acc: Accumulated) -> None:
    before = thread_counters()
    probe.start()
    pipe.send(body)
    got = pipe.recv()
    probe.stop()
    server = counter_delta(before, thread_counters())
    order = probe.delta_tokens
    if not probe.one_token_per_decode:
        raise RuntimeError(
            "llama_decode calls and sampled tokens differ (speculation?): the token path is "
            "measured on plain one-token steps; serve the model without speculation"
        )
    if len(got["frames"]) != len(order):
        raise RuntimeError(
            f"the client saw {len(got['frames'])} text frames for {len(order)} streamed Deltas"
        )
    probe.marks["client"] = dict(zip(order, got["frames"], strict=True))
    acc.add_round(per_token(probe.marks, order), len(order))
    python = {t.native_id for t in threading.enumerate()}
    names = {
        srv.worker.engine._thread.native_id: "decode thread (+ llama.cpp's first worker)",
        srv.loop_tid: "event loop (uvicorn)",
        threading.main_thread().native_id: "bench driver (waits)",
    }
    for tid, v in server.items():
        other = "other Python threads" if tid in python else "llama.cpp worker threads"
        add_counters(acc.groups, names.get(tid, other), tid, v)
    for tid, v in got["threads"].items():
        add_counters(acc.groups, "client process", tid, v)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.tokenpath", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--tokens", type=int, default=128, help="tokens per request (default 128)")
    p.add_argument("--rounds", type=int, default=5, help="measured requests (default 5)")
    p.add_argument("--contend", type=int, default=0, metavar="N", help="N busy-loop processes")
    p.add_argument("--model", help="registry model (default: the default model)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        choices=sorted(VARIANTS),
        help="also measure this variant, interleaved: "
        + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()),
    )
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    rep = run(args.tokens, args.rounds, args.contend, args.model, tuple(args.variant))
    rep.pop("_rows")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=2))
    print(markdown(rep), end="")


if __name__ == "__main__":
    main()
