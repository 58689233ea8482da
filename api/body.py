"""Reading a request body against the clock: a client that trickles its body is cut off.

aiohttp bounds the request head (``--header-timeout``, see ``api/server.py``) but not the body.
Every reader of a body (``json_body``, the multipart upload, a step's returned output) awaits
its reads through one :class:`BodyClock`: after ``--body-timeout`` seconds of grace the body
must have arrived at an average of at least ``--body-min-rate`` bytes per second, otherwise the
request is answered 408 and its connection closed. The budget grows with what has arrived, so
a large upload over a slow but honest link is fine, and one byte every few seconds is not.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, TypeVar

from aiohttp import web

from mlynar_events.config import ApiSettings
from mlynar_events.errors import CommandError

T = TypeVar("T")


class BodyTimeout(CommandError):
    """408: the body did not arrive in time; the connection is closed after the answer."""

    status = 408


class BodyClock:
    def __init__(self, request: web.Request, settings: ApiSettings) -> None:
        self._content = request.content
        self._grace = settings.body_timeout
        self._rate = max(settings.body_min_rate, 1)
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()

    def _remaining(self) -> float:
        allowed = self._grace + self._content.total_bytes / self._rate
        return self._start + allowed - self._loop.time()

    async def __call__(self, read: Awaitable[T]) -> T:
        """``await read`` within what is left of the body's time."""
        try:
            async with asyncio.timeout(max(self._remaining(), 0.0)) as deadline:
                return await read
        except TimeoutError:
            if deadline.expired():
                raise BodyTimeout(
                    f"the request body arrived too slowly (it must average {self._rate} bytes/s "
                    f"after {self._grace:g}s)", {"received": self._content.total_bytes}) from None
            raise

    async def chunks(self, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``source``'s chunks, each read on the clock."""
        while True:
            try:
                chunk = await self(source.__anext__())
            except StopAsyncIteration:
                return
            yield chunk
