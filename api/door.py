"""The door: only same-origin requests for a host this service answers for get in.

Why: the API runs other people's code, and on loopback without a token it needs no credential.
A web page the user visits could otherwise drive it: a cross-site "simple" request (a form, or
``fetch`` with ``Content-Type: text/plain``) carries no credential but still reaches a loopback
server, and DNS rebinding makes a foreign name resolve to 127.0.0.1 so the browser even reads
the answers. Both are stopped here, before any handler runs:

* **Host** must be a name the service answers for: a loopback name (``localhost``,
  ``127.0.0.1``, ``[::1]``, any port), the address it is bound to (when not a wildcard),
  ``--public-url``'s host, or one of ``--allowed-host``. A rebinding page sends its own name as
  Host, so this refuses it, for reads too.
* On a state-changing method (anything but GET, HEAD, OPTIONS) a present **Origin** must be
  this very origin (the Host's name and port), ``--public-url``'s origin, or an allowed host.
  ``Origin: null`` (sandboxed frames, ``file:`` pages) is refused.
* A JSON body must say it is JSON (``application/json`` or ``+json``), which a cross-site page
  cannot send without a CORS preflight that this API never grants; ``api/errors.py::json_body``
  checks it where the body is read. An empty body (Mlynar's ``POST /api/run``) needs no type.

Routes with their own non-ambient credential or nothing to protect skip the door
(:class:`api.routes.Access`): the Kubernetes step routes (the step Job reaches the API by its
in-cluster Service name and sends the step's own bearer credential, which no browser attaches
by itself) and ``/healthz``/``/api/openapi.json`` (kubelet probes send the pod's IP as Host).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from mlynar_events.config import ApiSettings
from mlynar_events.netaddr import is_loopback

from .errors import error
from .hosts import HostPort, is_unspecified, parse_host
from .routes import Access, route_of

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


@dataclass(frozen=True)
class Door:
    """The names and origins of one API's settings (built once, at start)."""

    bound: str | None  # the address the API listens on, unless it is a wildcard
    allowed: frozenset[str]  # --allowed-host names: any port, either scheme
    public_origin: tuple[str, str, int] | None  # (scheme, name, port) of --public-url

    @classmethod
    def of(cls, s: ApiSettings) -> "Door":
        """ValueError for an --allowed-host or --public-url that is not a host name or URL."""
        allowed: set[str] = set()
        for text in s.allowed_host:
            parsed = parse_host(text.strip())
            if parsed is None:
                raise ValueError(f"--allowed-host {text!r} is not a host name or address (host[:port])")
            allowed.add(parsed.name)
        public_origin = None
        if s.public_url:
            parts = urlsplit(s.public_url)
            parsed = parse_host(parts.netloc)
            if parts.scheme not in {"http", "https"} or parsed is None:
                raise ValueError(f"--public-url {s.public_url!r} is not an http(s) URL with a host")
            public_origin = (parts.scheme, parsed.name, parsed.port or _default_port(parts.scheme))
        bound = parse_host(f"[{s.host.strip('[]')}]" if ":" in s.host else s.host)
        if bound is not None and is_unspecified(bound.name):
            bound = None
        return cls(bound=bound.name if bound else None, allowed=frozenset(allowed), public_origin=public_origin)

    def answers_for(self, host: HostPort) -> bool:
        return (is_loopback(host.name) or host.name == self.bound or host.name in self.allowed
                or (self.public_origin is not None and host.name == self.public_origin[1]))

    def origin_allowed(self, origin: str, host: HostPort) -> bool:
        """The request's own origin, --public-url's, or an allowed host's; never ``null``."""
        parts = urlsplit(origin)
        o = parse_host(parts.netloc)
        if parts.scheme not in {"http", "https"} or o is None or parts.path or parts.query or parts.fragment:
            return False
        port = o.port or _default_port(parts.scheme)
        return ((o.name, port) == (host.name, host.port or _default_port(parts.scheme))
                or (parts.scheme, o.name, port) == self.public_origin
                or o.name in self.allowed)

    def refusal(self, request: web.Request) -> str | None:
        """Why ``request`` may not come in, or ``None``."""
        raw_host = request.headers.get(hdrs.HOST)
        host = parse_host(raw_host)
        if host is None:
            return "the request has no valid Host header"
        if not self.answers_for(host):
            return (f"Host {raw_host!r} is not a name this service answers for (loopback names, "
                    "--public-url's host, --allowed-host)")
        if request.method in SAFE_METHODS:
            return None
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not self.origin_allowed(origin.strip(), host):
            return f"cross-origin request refused: Origin {origin!r} is not this service's origin"
        return None


DOOR: web.AppKey[Door] = web.AppKey("door", Door)


@web.middleware
async def door_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    route = route_of(request)
    if route is None or route.access is Access.API:
        reason = request.app[DOOR].refusal(request)
        if reason is not None:
            return error(403, reason, {"host": request.headers.get(hdrs.HOST),
                                       "origin": request.headers.get(hdrs.ORIGIN)})
    return await handler(request)
