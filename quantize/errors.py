"""The one error this package raises for problems a user can act on."""

from __future__ import annotations

from server.errors import CodeserveError


class QuantizeError(CodeserveError):
    """A bad source, a failed quantization or conversion; the message says what to do.

    It is a ``CodeserveError`` so ``codeserve``'s CLI prints it as one line and exits 2.
    """
