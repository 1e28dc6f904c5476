"""Time stamps along one token's path, put in at run time around codeserve's own functions.

Nothing in ``server/`` is edited or slowed when this module is not installed: `install` replaces
a few attributes (instance attributes where the code looks them up on an instance, module
globals where it looks them up in its module) with wrappers that take a ``perf_counter_ns`` stamp
and call the original, and `uninstall` puts the originals back. Each stamp is keyed by the
token's index in the current request (the k-th pick of a sampled token made token
k), so the stages of one token line up across the decode thread, the event loop and the client.

Only one stream is measured at a time (the tool sends one request at a time), which is what lets
the event-loop side find the token a chunk belongs to: the dialect, JSON encoding and send of
one chunk run back to back before the next event is pulled.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.engine.base import Delta, Event, EventSink

ns = time.perf_counter_ns


class Probe:
    """The stamps of one request: ``marks[stage][token index] = ns``."""

    def __init__(self) -> None:
        self.on = False
        self.variant = "served"  # which variant of the serving stack the next request goes through
        self.marks: dict[str, dict[int, int]] = defaultdict(dict)
        self._decodes = 0  # llama_decode calls in this request (decode k feeds sample k)
        self._samples = 0
        self._deltas: list[int] = []  # Delta ordinal → token index, appended by the decode thread
        self._delivered = 0  # Deltas seen by the event loop so far
        self.current: int | None = None  # token whose chunk the event loop is encoding/sending

    def start(self) -> None:
        self.marks = defaultdict(dict)
        self._decodes = self._samples = self._delivered = 0
        self._deltas = []
        self.current = None
        self.on = True

    def stop(self) -> None:
        self.on = False

    @property
    def delta_tokens(self) -> list[int]:
        """Token index of each streamed Delta, in order (the client's frames follow it)."""
        return list(self._deltas)

    def mark(self, stage: str, k: int | None, t: int | None = None) -> None:
        if self.on and k is not None:
            self.marks[stage][k] = ns() if t is None else t

    # -- decode thread -------------------------------------------------------------------------

    def decode(self, fn: Callable[..., int]) -> Callable[..., int]:
        def timed(*args: Any) -> int:
            t0 = ns()
            rc = fn(*args)
            t1 = ns()
            if self.on:
                k = self._decodes
                self._decodes += 1
                self.mark("decode_start", k, t0)
                self.mark("decode_end", k, t1)
            return rc

        return timed

    def sample(self, fn: Callable[..., int]) -> Callable[..., int]:
        def timed(*args: Any) -> int:
            t0 = ns()
            token = fn(*args)
            t1 = ns()
            if self.on:
                k = self._samples
                self._samples += 1
                self.mark("sample_start", k, t0)
                self.mark("sample_end", k, t1)
            return token

        return timed

    @property
    def one_token_per_decode(self) -> bool:
        """Whether every llama_decode of the request gave one sampled token (no speculation, no
        calibration pass): what keying the decode thread's stamps by token assumes."""
        return self._decodes == self._samples

    @property
    def last_token(self) -> int | None:
        return self._samples - 1 if self._samples else None

    def sink(self, inner: EventSink) -> EventSink:
        probe = self

        class Timed:
            def __call__(self, event: Event) -> None:
                if not (probe.on and isinstance(event, Delta) and event.token_ids):
                    return inner(event)
                k = probe.last_token
                assert k is not None
                probe._deltas.append(k)
                probe.mark("emit_start", k)
                inner(event)
                probe.mark("emit_end", k)

            def wait_taken(self, timeout_s: float) -> bool:
                if probe.variant == "nowait":
                    return True
                t0 = ns()
                taken = inner.wait_taken(timeout_s)
                probe.mark("wait_start", probe.last_token, t0)
                probe.mark("wait_end", probe.last_token)
                if taken:  # the frame of the token just sampled is out
                    probe.mark("taken", probe.last_token)
                return taken

        return Timed()

    # -- event loop ------------------------------------------------------------------------------

    def delivered(self, fn: Callable[[Any, Event], None]) -> Callable[[Any, Event], None]:
        def timed(job: Any, event: Event) -> None:
            if self.on and isinstance(event, Delta) and event.token_ids:
                d = self._delivered
                self._delivered += 1
                self.mark("delivered", self._deltas[d] if d < len(self._deltas) else None)
            fn(job, event)

        return timed

    def dialect(self, chunks: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        """Around a dialect's chunk generator: when it got each Delta and yielded its chunk."""
        probe = self

        async def timed(events: AsyncIterator[Event], *args: Any, **kwargs: Any) -> Any:
            seen = 0

            async def pulled() -> AsyncIterator[Event]:
                nonlocal seen
                async for ev in events:
                    if isinstance(ev, Delta) and ev.token_ids and seen < len(probe._deltas):
                        probe.current = probe._deltas[seen]
                        seen += 1
                        probe.mark("dialect_got", probe.current)
                    else:
                        probe.current = None
                    yield ev

            async for chunk in chunks(pulled(), *args, **kwargs):
                probe.mark("chunk_built", probe.current)
                yield chunk

        return timed


class LibProxy:
    """llama_cpp as a module object, with a few functions replaced (timed)."""

    def __init__(self, lib: Any, **overrides: Any) -> None:
        self._lib = lib
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)


class Installed:
    """What `install` replaced, so `uninstall` can put it back."""

    def __init__(self) -> None:
        self.restore: list[tuple[Any, str, Any, bool]] = []  # obj, attr, old, was instance attr

    def replace(self, obj: Any, attr: str, new: Any) -> None:
        own = attr in getattr(obj, "__dict__", {})
        self.restore.append((obj, attr, getattr(obj, attr), own))
        setattr(obj, attr, new)

    def uninstall(self) -> None:
        for obj, attr, old, own in reversed(self.restore):
            if own:
                setattr(obj, attr, old)
            else:  # a method found on the class: drop the instance's override
                delattr(obj, attr)
        self.restore = []


def install(probe: Probe, worker: Any) -> Installed:
    """Wrap the token path of ``worker`` (a ModelWorker on the batched engine) and of the OpenAI
    completions route."""
    import json

    from server.api.openai import completions, streaming
    from server.api.sse import EventStream
    from server.engine import batch_choices, batched
    from server.engine.text import TextReleaser

    engine = worker.engine
    if not isinstance(engine, batched.BatchedEngine):
        raise RuntimeError(f"the token path is probed on the batched engine, not {engine!r}")
    done = Installed()

    # Decode thread: llama_decode (through the context's library handle), sampling, release, emit.
    ctx = engine._ctx
    done.replace(ctx, "_lib", LibProxy(ctx._lib, llama_decode=probe.decode(ctx._lib.llama_decode)))
    done.replace(engine._choices, "pick", probe.sample(engine._choices.pick))

    class TimedReleaser(TextReleaser):
        def push(self, *args: Any, **kwargs: Any) -> Any:
            out = super().push(*args, **kwargs)
            probe.mark("release_end", probe.last_token)
            return out

    done.replace(batch_choices, "TextReleaser", TimedReleaser)
    submit = engine.submit
    done.replace(engine, "submit", lambda request, sink: submit(request, probe.sink(sink)))

    # Event loop: the hand-off, the dialect, JSON, SSE framing and the send.
    done.replace(worker, "_deliver", probe.delivered(worker._deliver))
    done.replace(completions, "_chunks", probe.dialect(completions._chunks))

    class TimedJson:
        def __getattr__(self, name: str) -> Any:
            return getattr(json, name)

        @staticmethod
        def dumps(*args: Any, **kwargs: Any) -> str:
            k = probe.current
            probe.mark("json_start", k)
            out = json.dumps(*args, **kwargs)
            probe.mark("json_end", k)
            return out

    done.replace(streaming, "json", TimedJson())

    class TimedSSE(EventStream):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def timed_send(message: Any) -> None:
                k = probe.current if _frame(message) else None
                probe.mark("sse_send", k)
                await send(message)

            await super().__call__(scope, receive, timed_send)

    done.replace(streaming, "EventStream", TimedSSE)
    return done


def _frame(message: Any) -> bool:
    """A body chunk carrying a JSON event: not the head, a keep-alive ping or the end."""
    return bool(message.get("more_body")) and message.get("body", b"").startswith(b"data: {")


class OuterSend:
    """ASGI wrapper given to uvicorn: stamps the send uvicorn itself implements (h11 + write)."""

    def __init__(self, app: Any, probe: Probe, variants: dict[str, Any] | None = None) -> None:
        self.app = app
        self.probe = probe
        self.variants = variants or {}  # the app another way, for the probe's current variant

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        probe = self.probe
        app = self.variants.get(probe.variant, self.app)
        cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle
        if cycle is not None and hasattr(cycle, "transport"):
            cycle.transport = TimedTransport(cycle.transport, probe)

        async def timed_send(message: Any) -> None:
            k = probe.current if _frame(message) else None
            probe.mark("asgi_send", k)
            await send(message)
            probe.mark("asgi_sent", k)

        await app(scope, receive, timed_send)


class TimedTransport:
    """A connection's transport whose write() is stamped: the bytes are handed to the kernel."""

    def __init__(self, transport: Any, probe: Probe) -> None:
        self._transport = transport
        self._probe = probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        # h11 writes a chunk as "<size>\r\n<frame>\r\n"
        k = self._probe.current if data.find(b"\r\ndata: {", 0, 24) >= 0 else None
        self._probe.mark("wire", k)
        self._transport.write(data)
        self._probe.mark("written", k)
