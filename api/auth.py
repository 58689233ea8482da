"""Bearer-token auth for the API, decided by the matched route (:class:`api.routes.Access`),
never by the path's text: a path that merely *contains* ``/returns/`` is an ordinary route.

* ``PUBLIC`` routes pass; ``STEP`` routes pass here and check the step's own credential in their
  handler (``api/returns.py``).
* Everything else needs ``Authorization: Bearer <--api-token-file>`` (compared in constant time).
  Without a token file the API is anonymous, which ``mlynar serve`` allows only on a loopback
  address (or, explicitly, with ``--insecure-no-auth``); this middleware applies the same rule
  again so an API built some other way cannot end up open by accident.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from mlynar_events.config import ApiSettings
from mlynar_events.netaddr import is_loopback

from .context import ctx
from .errors import error
from .routes import Access, route_of


def anonymous_allowed(s: ApiSettings) -> bool:
    """No token configured is only fine where nobody else can connect, or when told so."""
    return s.api_token_file is None and (is_loopback(s.host) or s.insecure_no_auth)


@web.middleware
async def auth_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    route = route_of(request)
    if route is not None and route.access is not Access.API:
        return await handler(request)
    c = ctx(request)
    token = c.api_token
    if token is None:
        if anonymous_allowed(c.settings):
            return await handler(request)
        return error(401, "this API requires a bearer token and has none configured", None)
    header = request.headers.get("Authorization", "")
    if not header:
        return error(401, "missing bearer token", None)
    scheme, _, given = header.partition(" ")
    # header text is decoded with surrogateescape, so this encodes any header back to its bytes
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                                             token.encode()):
        return error(403, "invalid bearer token", None)
    return await handler(request)
