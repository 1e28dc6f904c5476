"""Stored responses, so ``previous_response_id`` can continue a conversation (``store``).

Kept in memory, newest ``capacity`` only: a restart or eviction forgets them, and a later
``previous_response_id`` naming one is a 400 that says so (clients then resend the history).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock
from typing import Any

from server.api.openai.responses_protocol import Response
from server.errors import CodeserveError, InvalidRequest

DEFAULT_CAPACITY = 1024


class ResponseNotFound(CodeserveError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


@dataclass(frozen=True)
class Stored:
    response: Response
    # The conversation up to and including this response's output, as chat messages, without
    # its instructions: OpenAI does not carry instructions over to the next response.
    history: tuple[dict[str, Any], ...]


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._capacity = capacity
        self._lock = Lock()

    def put(self, stored: Stored) -> None:
        with self._lock:
            self._items[stored.response.id] = stored
            self._items.move_to_end(stored.response.id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None

    def history(self, previous_response_id: str) -> list[dict[str, Any]]:
        """The messages a new response continues from; 400 naming the field if unknown."""
        stored = self.get(previous_response_id)
        if stored is None:
            raise InvalidRequest(
                f"Previous response with id {previous_response_id!r} not found: it was not "
                "stored (store=false), or this server restarted or evicted it.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return [dict(m) for m in stored.history]
