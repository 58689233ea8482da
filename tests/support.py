"""Helpers for tests: waiting on conditions, and a thin client of a running service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from mlynar_events.config import ServeSettings

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


async def wait_until(predicate: Callable[[], Awaitable[Any]], timeout: float = 20.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on a free loopback port for the block: its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def json_records(text: str) -> list[dict[str, Any]]:
    """The JSON log records (``--log-format json``) in a process's output, other lines skipped."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def service_settings(tmp_path: Path, nats_url: str | None, **overrides: Any) -> ServeSettings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "data", nats_url=nats_url, port=0, registry=[EXAMPLES],
        log_level="WARNING",
    )
    values.update(overrides)
    return ServeSettings(**values)


class Api:
    """A thin client of a running service: JSON in, (status, JSON) out."""

    def __init__(self, http: aiohttp.ClientSession, service: Any) -> None:
        self.http = http
        self.service = service

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.request(method, path, **kw) as r:
            text = await r.text()
            try:
                import json

                body = json.loads(text) if text else None
            except ValueError:
                body = text
            return r.status, body

    async def create_run(self) -> str:
        status, body = await self.call("POST", "/api/run")
        assert status == 201, body
        return body["id"]

    async def upload(self, run_id: str, kind: str, data: bytes, field: str = "file", filename: str = "data.json") -> tuple[int, Any]:
        form = aiohttp.FormData()
        form.add_field(field, data, filename=filename, content_type="application/octet-stream")
        return await self.call("POST", f"/api/run/{run_id}/upload/{kind}", data=form)

    async def run(self, run_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/api/run/{run_id}")
        assert status == 200, body
        return body

    async def wait_status(self, run_id: str, *statuses: str, timeout: float = 30.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            run = await self.run(run_id)
            return run if run["status"] in statuses else None

        return await wait_until(check, timeout, what=f"run {run_id} to be {statuses}")

    async def content(self, url: str) -> bytes:
        async with self.http.get(url) as r:
            assert r.status == 200, await r.text()
            return await r.read()


class CuttingProxy:
    """A TCP proxy in front of a loopback server (the API, NATS) that can cut every open
    connection at once, as a flaky network or a load balancer would (:meth:`cut`), or also refuse
    new ones, as a partition would (:meth:`close`); it keeps what went through each way."""

    def __init__(self, target: str) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.up, self.down = bytearray(), bytearray()
        self.sockets: list[socket.socket] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, self.up), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.down), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, seen: bytearray) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                with self.changed:
                    seen.extend(data)
                    self.changed.notify_all()
                dst.sendall(data)
            except OSError:
                break
        self._shut(src, dst)

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self._shut(*self.sockets)

    def wait(self, predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), f"timed out waiting for {what}"

    def resumed_from(self) -> list[int]:
        return [int(x) for x in re.findall(rb"Last-Event-ID: (\d+)", bytes(self.up))]

    def close(self) -> None:
        """Cut, and refuse connections from now on (on Linux only a shutdown wakes the accept
        blocked on the listening socket; a bare close would leave it listening)."""
        self._shut(self.server)
        self.server.close()
        self.cut()
