"""The batched engine's bookkeeping: sequence slots, the choices decoding in them, requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.base import Finished, GenerationRequest
from server.engine.text import TextReleaser


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # exactly what its KV cache holds
    busy: bool = False
    released: float = 0.0  # when its last request left (perf_counter)


@dataclass(eq=False)
class Choice:
    group: Group
    index: int
    slot: Slot
    sampler: object
    releaser: TextReleaser
    state: str = "prefill"  # prefill (waiting for the prompt) → eval_last → decode → done
    last: int = -1  # token to feed next step
    completion: int = 0
    t_first: float | None = None


@dataclass(eq=False)
class Group:
    """One request: its choices, and where its events go (straight from the decode loop)."""

    req: GenerationRequest
    cancelled: Callable[[], bool]
    emit: Callable[[object], None]
    done: threading.Event = field(default_factory=threading.Event)
    finished_sent: int = 0
    t0: float = field(default_factory=time.perf_counter)
    base_seed: int = 0
    next_index: int = 0
    primary: Slot | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    cached: int = 0
    choices: list[Choice] = field(default_factory=list)
    finished: int = 0

    @property
    def remaining(self) -> int:
        return self.req.n - self.next_index

    def send(self, item: object) -> None:
        self.emit(item)
        self.finished_sent += isinstance(item, Finished)
        if isinstance(item, BaseException) or self.finished_sent >= self.req.n:
            self.done.set()
