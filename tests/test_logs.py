"""Logs say what happened without letting a client fill them with tracebacks."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from mlynar_events.logs import ClientErrorFilter
from support import serving


async def test_a_request_aiohttp_cannot_parse_is_one_info_line(caplog) -> None:
    """A real aiohttp server and a raw socket sending what the security test sent."""
    server_log = logging.getLogger("aiohttp.server")
    guard = ClientErrorFilter()
    server_log.addFilter(guard)
    app = web.Application()
    app.router.add_get("/api/runs", lambda r: web.json_response([]))
    try:
        async with serving(app) as base:
            port = int(base.rsplit(":", 1)[1])
            with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
                for raw in ("GET /api/runs?limit=\u0663 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n"):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(raw)
                    await writer.drain()
                    answer = await reader.read(200)
                    writer.close()
                    assert b" 400 " in answer.split(b"\r\n", 1)[0], answer
            records = [r for r in caplog.records if r.name == "aiohttp.server"]
            assert len(records) == 3
            assert all(r.levelno == logging.INFO and not r.exc_info and "malformed request answered 400" in r.getMessage()
                       for r in records), [(r.levelname, r.getMessage()) for r in records]
    finally:
        server_log.removeFilter(guard)
