"""The API's HTTP server limits: a request-head timeout and a cap on open connections.

aiohttp closes a connection that has not delivered a complete request head within its
``keepalive_timeout`` (counted from the connection's start, and again after each answer), so
``--header-timeout`` is that value: a client trickling its headers is cut off, and so is an idle
keep-alive connection. Bodies have their own clock (``api/body.py``). aiohttp has no connection
cap; :class:`ApiRunner` answers the connection beyond ``--max-connections`` with a 503 and
closes it, so slow or idle clients cannot use up the process's file descriptors.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .context import CTX
from .models import ErrorBody

log = logging.getLogger("mlynar.api.server")
LINGERING_TIME = 5.0
"""Seconds aiohttp keeps reading (and ignoring) a body it answered early, e.g. with 413/408."""


def _busy_response() -> bytes:
    message = "too many open connections; try again later"
    body = ErrorBody(error=message, statusCode=503, message=message).model_dump_json().encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` with the limits of the app's :class:`~mlynar_events.config.ApiSettings`."""

    def __init__(self, app: web.Application) -> None:
        settings = app[CTX].settings
        super().__init__(app, access_log=None, keepalive_timeout=settings.header_timeout,
                         lingering_time=LINGERING_TIME)
        self._max_connections = settings.max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        accept = server.connection_made
        limit = self._max_connections

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            accept(handler, transport)
            if len(server.connections) > limit:
                log.debug("connection refused: too many open connections", extra={"limit": limit})
                transport.write(_busy_response())
                # closed on the next loop turn: aiohttp starts the handler's task right after
                # this hook, and that task must see the connection before it is lost
                asyncio.get_running_loop().call_soon(handler.force_close)

        server.connection_made = connection_made  # type: ignore[method-assign]
        return server
