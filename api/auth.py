"""Bearer-token auth for the API. With no token configured (the embedded default, which only
listens on loopback) every request passes; ``mlynar serve`` refuses a non-loopback address
without a token unless told ``--insecure-no-auth``."""

from __future__ import annotations

import hmac

from aiohttp import web

from .context import ctx
from .errors import error

PUBLIC = {"/healthz", "/api/openapi.json"}


@web.middleware
async def auth_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    token = ctx(request).api_token
    if token is None or request.path in PUBLIC or request.path.startswith("/api/run/") and "/returns/" in request.path:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if not header:
        return error(401, "missing bearer token", None)
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return error(403, "invalid bearer token", None)
    return await handler(request)
