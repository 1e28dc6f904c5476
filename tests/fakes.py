"""A fake engine for unit tests of scheduling logic (never used on the serving path)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from server.engine.base import Delta, Finished, GenerationRequest, ModelInfo, Timings


@dataclass
class FakeEngine:
    token_s: float = 0.01
    slots: int = 1
    size_bytes: int = 1
    info: ModelInfo = field(init=False)
    served: list[list[int]] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.info = ModelInfo(
            n_ctx=128,
            n_vocab=100,
            chat_template=None,
            bos_token="",
            eos_token="",
            size_bytes=self.size_bytes,
        )

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return [ord(c) % 100 for c in text]

    def kv_tokens(self) -> int:
        return 0

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t + 32) for t in tokens)

    def generate(self, req: GenerationRequest, cancelled):
        self.served.append(req.prompt)
        n = 0
        reason = "length"
        for n in range(1, req.max_tokens + 1):
            time.sleep(self.token_s)
            yield Delta(0, "t", (n,))
            if cancelled():
                reason = "cancelled"
                break
        yield Finished(0, reason, Timings(len(req.prompt), 0, n, 0.0, 0.0))

    def close(self) -> None:
        self.closed.set()
