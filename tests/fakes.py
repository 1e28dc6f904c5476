"""A fake engine for unit tests of scheduling logic (never used on the serving path).

It keeps the engine contract: ``submit`` returns at once, events come from another thread, every
request ends with one ``End``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from server.engine.base import (
    CacheStats,
    Delta,
    End,
    EventSink,
    Finished,
    GenerationRequest,
    ModelInfo,
    Request,
    Timings,
)


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class FakeEngine:
    token_s: float = 0.01
    capacity: int = 1
    size_bytes: int = 1
    fail_after: int | None = None  # raise inside the engine after this many tokens
    wait_taken_s: float | None = None  # after each token, wait this long for it to be taken
    waits: list[tuple[float, float, bool]] = field(default_factory=list)  # start, end, taken
    info: ModelInfo = field(init=False)
    served: list[list[int]] = field(default_factory=list)
    running: int = 0  # requests inside the engine right now
    most_running: int = 0
    closed: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.info = ModelInfo(
            n_ctx=128,
            n_vocab=100,
            chat_template=None,
            bos_token="",
            eos_token="",
            size_bytes=self.size_bytes,
        )
        self.kv_cells = 128 * self.capacity

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return [ord(c) % 100 for c in text]

    def kv_tokens(self) -> int:
        return 0

    def cache_stats(self) -> CacheStats:
        return CacheStats()

    def cpu_threads(self) -> int:
        return 1

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t + 32) for t in tokens)

    def submit(self, request: Request, sink: EventSink) -> FakeHandle:
        assert isinstance(request, GenerationRequest)
        handle = FakeHandle()
        with self._lock:
            self.served.append(request.prompt)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        threading.Thread(target=self._run, args=(request, sink, handle), daemon=True).start()
        return handle

    def _run(self, req: GenerationRequest, sink: EventSink, handle: FakeHandle) -> None:
        n = 0
        reason = "length"
        try:
            for n in range(1, req.max_tokens + 1):
                time.sleep(self.token_s)
                if self.fail_after is not None and n > self.fail_after:
                    raise RuntimeError("llama_decode returned -1")
                sink(Delta(0, "t", (n,)))
                if self.wait_taken_s is not None:
                    t0 = time.perf_counter()
                    taken = sink.wait_taken(self.wait_taken_s)
                    self.waits.append((t0, time.perf_counter(), taken))
                if handle.cancelled.is_set():
                    reason = "cancelled"
                    break
            sink(Finished(0, reason, Timings(len(req.prompt), 0, n, 0.0, 0.0)))  # type: ignore[arg-type]
        except Exception as e:
            error: BaseException | None = e
        else:
            error = None
        with self._lock:
            self.running -= 1
        sink(End(error))

    def close(self) -> None:
        self.closed.set()
