"""Who is calling, and may they call this route: decided by the matched route
(:class:`api.routes.Route`'s ``access`` and ``role``), never by the path's text (a path that merely
*contains* ``/returns/`` is an ordinary route).

* ``PUBLIC`` routes pass; ``STEP`` routes pass here and check the step's own credential in their
  handler (``api/returns.py``).
* Everything else needs a principal (:mod:`mlynar_events.principals`): ``Authorization: Bearer``
  with the bootstrap token of ``--api-token-file`` (the principal ``admin``, compared in constant
  time) or a token created with ``POST /api/tokens`` (looked up by its SHA-256 in the ``tokens``
  view, unrevoked). Without any token configured the API is anonymous, which ``mlynar serve``
  allows only on a loopback address (or, explicitly, with ``--insecure-no-auth``); this
  middleware applies the same rule again so an API built some other way cannot end up open by
  accident. A bearer token given to an anonymous API must still be valid, and then is who the
  caller is (so tools can act as a member on a loopback service too).
* The principal's role must allow the route's (:meth:`Role.allows`): 403 otherwise. Which runs
  and machines a member may touch is decided where they are loaded (:func:`visible_run`,
  ``api/machines.py``), since it depends on the object, not the route.

The principal is ``request[PRINCIPAL]`` (:mod:`api.principal`, which the handlers use).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from mlynar_events.config import ApiSettings
from mlynar_events.netaddr import is_loopback
from mlynar_events.principals import ANONYMOUS, BOOTSTRAP_ADMIN, Principal, Role, token_digest
from projections import token_views

from .context import ctx
from .errors import error
from .principal import PRINCIPAL, TOKEN_DIGEST
from .routes import Access, route_of


def anonymous_allowed(s: ApiSettings) -> bool:
    """No token configured is only fine where nobody else can connect, or when told so."""
    return s.api_token_file is None and (is_loopback(s.host) or s.insecure_no_auth)


async def _principal_of(request: web.Request, given: str) -> Principal | None:
    c = ctx(request)
    # header text is decoded with surrogateescape, so this encodes any header back to its bytes
    raw = given.encode("utf-8", "surrogateescape")
    if c.api_token is not None and hmac.compare_digest(raw, c.api_token.encode()):
        return BOOTSTRAP_ADMIN
    digest = token_digest(given)
    found = await token_views.active_by_digest(c.db, digest)
    if found is None:
        return None
    request[TOKEN_DIGEST] = digest  # a stream that stays open checks it again (api/principal.py)
    return Principal(found[0], Role(found[1]))


@web.middleware
async def auth_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    route = route_of(request)
    if route is not None and route.access is not Access.API:
        return await handler(request)
    c = ctx(request)
    header = request.headers.get("Authorization", "")
    if not header:
        if c.api_token is None and anonymous_allowed(c.settings):
            principal = ANONYMOUS
        elif c.api_token is None:
            return error(401, "this API requires a bearer token and has none configured", None)
        else:
            return error(401, "missing bearer token", None)
    else:
        scheme, _, given = header.partition(" ")
        found = await _principal_of(request, given.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            return error(403, "invalid bearer token", None)
        principal = found
    if route is not None and not principal.role.allows(route.needs):
        return error(403, f"{principal.name!r} ({principal.role}) may not do this: it needs the {route.needs} role",
                     {"principal": principal.name, "role": principal.role.value, "needs": route.needs.value})
    request[PRINCIPAL] = principal
    return await handler(request)
