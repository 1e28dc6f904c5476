"""ASGI middleware that refuses hostile requests before any route runs.

``HostGuard`` defeats DNS rebinding: a web page on attacker.example whose name is re-pointed at
127.0.0.1 reaches this server with ``Host: attacker.example`` and its own ``Origin``; both are
checked against names that can only be ours. ``BodyLimit`` caps request bodies, from
``Content-Length`` at once and while a chunked body streams in, so a huge upload costs nothing.
Both answer in the dialect's error envelope through ``server.api.errors``.

Starlette's TrustedHostMiddleware was not used: it answers a plain-text 400, cuts IPv6 literals at
their first colon and has no Origin check. Nor FastAPI's ``max_body_size``: it replaces any answer
to a request whose Content-Length is over the limit with a plain-text 413.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError, Respond

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
# Origins of local apps and IDE webviews; a web page cannot have these (Ollama allows the same).
DEFAULT_APP_ORIGINS = (
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)


def split_host(value: str) -> str:
    """The host name of a Host header or netloc, without port and IPv6 brackets, lower-case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:  # name:port; several colons is a bare IPv6 literal
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback_name(host: str) -> bool:
    ip = _ip(host)
    if ip is not None:
        return ip.is_loopback
    # RFC 6761: *.localhost always resolves to loopback; browsers never ask DNS for it.
    return host in _LOOPBACK_NAMES or host.endswith(".localhost")


def _matches(host: str, patterns: Iterable[str]) -> bool:
    return any(p == "*" or fnmatch.fnmatchcase(host, p.lower()) for p in patterns)


class HostGuard:
    """403 for a request whose ``Host`` or ``Origin`` is not one of ours.

    Allowed hosts: loopback names, IP literals (rebinding needs a DNS name the attacker controls,
    so a literal address is never one), the bound host (and this machine's name when bound to every
    interface), and ``allowed_hosts`` ("*" for any, "*.example.com" patterns). Allowed origins:
    http(s) on a loopback name, local-app schemes, the request's own host (same origin), and
    ``allowed_origins`` (patterns like "https://app.example.com", "http://localhost:*", "*").
    A request without ``Origin`` is not from a cross-site page and passes on its host alone.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        respond: Respond,
        bound_host: str,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.respond = respond
        self.allowed_hosts = [h.lower() for h in allowed_hosts]
        bound = split_host(bound_host)
        names = {bound} if bound else set()
        ip = _ip(bound)
        if bound in ("", "0.0.0.0", "::") or (ip is not None and ip.is_unspecified):
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.own_names = {n for n in names if n}
        self.allowed_origins = [*DEFAULT_APP_ORIGINS, *allowed_origins]

    def host_allowed(self, host: str) -> bool:
        return (
            is_loopback_name(host)
            or _ip(host) is not None
            or host in self.own_names
            or _matches(host, self.allowed_hosts)
        )

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        if _matches(origin, self.allowed_origins):
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames), data:, ...
        if is_loopback_name(split_host(parts.netloc)):
            return True
        return parts.netloc.lower() == host_header.strip().lower()  # same origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no websocket routes; lifespan has no host
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host_header = headers.get("host", "")
        problem = None
        if host_header and not self.host_allowed(split_host(host_header)):
            problem = (
                f"Host {host_header!r} is not allowed; add it to CODESERVE_ALLOWED_HOSTS if this "
                "server is meant to be reached by that name"
            )
        else:
            origin = headers.get("origin")
            if origin is not None and not self.origin_allowed(origin, host_header):
                problem = (
                    f"Origin {origin!r} is not allowed; add it to CODESERVE_ALLOWED_ORIGINS (or "
                    "CODESERVE_CORS_ORIGINS for browser apps) to let it call this server"
                )
        if problem is None:
            await self.app(scope, receive, send)
            return
        err = ApiError(403, problem, "invalid_request_error", code="forbidden_host")
        await self.respond(scope["path"], err)(scope, receive, send)


def _too_large(limit: int) -> str:
    return (
        f"Request body is larger than the server's limit of {limit} bytes (CODESERVE_MAX_BODY_MB)"
    )


class BodyLimit:
    """413 for a body over ``max_bytes``: at once from Content-Length, else as chunks arrive.

    A chunked body is read here, up to the limit, and handed on whole: an error raised from
    inside ``receive`` would reach the app wrapped by its middleware, not as a 413.
    """

    def __init__(self, app: ASGIApp, *, respond: Respond, max_bytes: int) -> None:
        self.app = app
        self.respond = respond
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:  # the server reads exactly this many bytes, no more
            if length.isdigit() and int(length) > self.max_bytes:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then only http.disconnect is left to come

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = ApiError(
            413,
            f"Request body is larger than the limit of {self.max_bytes} bytes "
            "(CODESERVE_MAX_BODY_MB)",
            "invalid_request_error",
        )
        await self.respond(scope["path"], err)(scope, receive, send)
