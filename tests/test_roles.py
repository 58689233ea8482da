"""The one lifecycle of a role (mlynar_events/roles.py): crash reported, drain awaited, LIFO stop."""

from __future__ import annotations

import asyncio
import contextlib

from mlynar_events.roles import closing, hosted


class Draining:
    """A role whose cancellation handler does asynchronous work, as the executor's does."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.started = log, name, asyncio.Event()

    async def run(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # an await inside the drain must be allowed to finish
            self.log.append(f"{self.name} drained")
            raise


class Crashing:
    async def run(self) -> None:
        raise RuntimeError("boom")


async def test_roles_drain_before_the_resources_they_use_close_newest_first() -> None:
    log: list[str] = []
    crashes: list[str] = []
    a, b = Draining(log, "a"), Draining(log, "b")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(closing(lambda: asyncio.sleep(0, log.append("store closed"))))
        await stack.enter_async_context(hosted("a", a, lambda n, e: crashes.append(n)))
        stack.push_async_callback(closing(lambda: asyncio.sleep(0, log.append("backend closed"))))
        await stack.enter_async_context(hosted("b", b, lambda n, e: crashes.append(n)))
        await a.started.wait()
        await b.started.wait()
    assert log == ["b drained", "backend closed", "a drained", "store closed"]
    assert crashes == []


async def test_a_crashing_role_is_reported_and_a_failing_close_does_not_stop_the_rest() -> None:
    crashed = asyncio.Event()
    seen: list[str] = []

    async def bad_close() -> None:
        raise OSError("disk gone")

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(closing(lambda: asyncio.sleep(0, seen.append("closed"))))
        stack.push_async_callback(closing(bad_close))
        await stack.enter_async_context(hosted("c", Crashing(), lambda n, e: (seen.append(f"{n}: {e}"), crashed.set())))
        await crashed.wait()
    assert seen == ["c: boom", "closed"]
