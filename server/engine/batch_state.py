"""The batched engine's bookkeeping: sequence slots, the choices decoding in them, requests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.base import End, Event, GenerationRequest
from server.engine.batch_draft_model import ModelDrafts
from server.engine.batch_drafts import SequenceDrafts
from server.engine.frames import Frames
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
    sampler: Any  # llama_sampler_p, freed when the choice finishes
    releaser: TextReleaser
    frames: Frames  # when its released text goes out
    # The sampler would pick the top logit but for these banned tokens: take the argmax instead.
    greedy: frozenset[int] | None = None
    state: str = "prefill"  # prefill (waiting for the prompt) → eval_last → decode → done
    last: int = -1  # token to feed next step
    completion: int = 0
    t_first: float | None = None
    # Set when it decodes speculatively (greedy): prompt lookup, or the model's draft model.
    drafts: SequenceDrafts | ModelDrafts | None = None
    drafted: int = 0
    accepted: int = 0
    passes: int = 0  # decode passes (each yields one token, more with accepted drafts)


@dataclass(eq=False)
class Group:
    """One request: its choices, and where its events go (straight from the decode loop)."""

    req: GenerationRequest
    cancelled: Callable[[], bool]
    emit: Callable[[Event], None]  # into the engine's outbox
    ended: bool = False
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

    def slots(self) -> set[Slot]:
        """Every slot the request took: its choices' and the primary's."""
        return {c.slot for c in self.choices} | ({self.primary} if self.primary else set())

    def send(self, event: Event) -> None:
        self.emit(event)

    def end(self, error: BaseException | None) -> None:
        """The request's last event: sent once, whether it finished, was cancelled or failed."""
        if not self.ended:
            self.ended = True
            self.emit(End(error))
