"""``GET /metrics`` of the API process, and the middleware timing every request
(``mlynar_http_request_duration_seconds``, :mod:`mlynar_events.metrics`).

A request is labelled with its route's **template** (``/api/run/{run_id}``), the entry of the
route table aiohttp matched (:func:`api.routes.route_of`), never with the path it asked for:
ids in paths would make the series unbounded. A path no route matches is ``unmatched``, a
method outside HTTP's usual ones ``other``.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from mlynar_events import metrics

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


async def metrics_page(request: web.Request) -> web.Response:
    """This process's metrics in the Prometheus text format."""
    return web.Response(body=await metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})


def route_label(request: web.Request) -> str:
    from .routes import route_of  # the route table imports this module's handler

    route = route_of(request)
    return route.path if route is not None else UNMATCHED


@web.middleware
async def metrics_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Outermost: sees the status every other middleware and handler ended with (an exception
    that escapes them all is a 500 to aiohttp, and is counted so)."""
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's number for it): nobody got an answer
        raise
    finally:
        method = request.method if request.method in METHODS else "other"
        metrics.HTTP_DURATION.labels(method, route_label(request), str(status)).observe(time.monotonic() - started)
