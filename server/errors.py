"""Domain errors, raised where a problem is known and rendered once by the API layer.

Each error carries the HTTP status and OpenAI error ``type``/``code`` it maps to, so the renderer
in ``server.api.errors`` stays a single generic handler.
"""

from __future__ import annotations


class CodeserveError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(CodeserveError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextOverflow(InvalidRequest):
    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    code = "unsupported_parameter"


class AuthenticationFailed(CodeserveError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(CodeserveError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class Overloaded(CodeserveError):
    """The model's queue is full: the client should retry later."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class QueueTimeout(CodeserveError):
    """The request waited longer than the configured limit without being scheduled."""

    status_code = 503
    error_type = "server_error"
    code = "queue_timeout"


class ShuttingDown(CodeserveError):
    """The server is stopping: it admits nothing new and ends what is still running."""

    status_code = 503
    error_type = "server_error"
    code = "shutting_down"


class ModelUnavailable(CodeserveError):
    """The model cannot be loaded or fetched (offline, corrupt file, memory budget)."""

    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"


class ConfigError(Exception):
    """A bad models.toml or settings value; raised at start-up, never over HTTP."""
