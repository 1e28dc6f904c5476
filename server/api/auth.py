"""Bearer-token check for /v1/* when an API key is configured."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import AuthenticationFailed


async def require_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed(
            "Missing API key: send it as `Authorization: Bearer <key>`", code="missing_api_key"
        )
    if not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise AuthenticationFailed("Incorrect API key provided")
