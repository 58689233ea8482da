"""The aiohttp application: middlewares, routes, shared state. Nothing here runs a role.

Middlewares, outermost first: metrics (each request's duration by route template,
``api/metrics.py``), errors (every failure becomes a JSON 4xx), the door (same-origin only,
``api/door.py``), auth (the route's credential, ``api/auth.py``)."""

from __future__ import annotations

from aiohttp import web

from .auth import auth_middleware
from .context import CTX, ApiContext
from .door import DOOR, Door, door_middleware
from .errors import errors_middleware
from .events import HUB, STREAMS, EventHub, close_streams
from .metrics import metrics_middleware
from .routes import add_routes
from .server import ApiRunner

__all__ = ["ApiRunner", "create_app"]


def create_app(context: ApiContext) -> web.Application:
    # uploads are streamed with their own limit; client_max_size only bounds bodies read whole
    app = web.Application(middlewares=[metrics_middleware, errors_middleware, door_middleware, auth_middleware],
                          client_max_size=context.settings.max_json_bytes)
    app[CTX] = context
    app[DOOR] = Door.of(context.settings)
    app[STREAMS] = set()
    app[HUB] = EventHub(context.store)
    app.on_shutdown.append(close_streams)  # open event streams end when the service stops
    add_routes(app)
    return app
