"""The logits that follow each recently evaluated prompt, so the same prompt sent again needs no
step before its first token.

A prompt whose cells are all cached (in a slot, or restored from the host-RAM prompt cache) still
needs the logits after its last token to start its choices, and llama.cpp keeps those only until
the next decode: llama-server and ``Llama`` evaluate that last token again, one full step (7–9 ms
on this machine's small models, more on bigger ones) before an exact repeat's first token. An
editor sends exact repeats (a completion asked again after the cursor came back, a cancelled
request sent again, a batch job's many samples of one prompt), so the row is kept here, keyed by
the whole prompt: the logits are a function of the tokens alone, whatever later happened to the
cells that hold them. Bounded in bytes, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

# A row is 4 bytes per vocabulary entry: 192 KiB for SmolLM2's 49,152, 1 MiB for Gemma 3's 262,144.
MAX_BYTES = 16 << 20


class PromptLogits:
    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self._rows: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self.bytes_held = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, prompt: Sequence[int]) -> np.ndarray | None:
        """The row after ``prompt`` (read-only), if kept."""
        row = self._rows.get(key := tuple(prompt))
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, prompt: Sequence[int], row: np.ndarray) -> None:
        """Keep a copy of ``row``, the logits after ``prompt``."""
        key = tuple(prompt)
        if key in self._rows:
            self._rows.move_to_end(key)
            return
        if row.nbytes > self.max_bytes:
            return
        kept = row.copy()
        kept.flags.writeable = False  # every repeat samples from it: nothing may edit it
        self._rows[key] = kept
        self.bytes_held += kept.nbytes
        while self.bytes_held > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self.bytes_held -= old.nbytes
