"""How a role lives inside a process: one pattern for all of them.

A role is an object with ``async def run()`` that reacts to the stream until cancelled, and
drains in its own cancellation handler (the executor hands its steps back, the projector commits
what it folded). :func:`hosted` is the lifecycle around it, as an async context manager in the
manner of Temporal's workers: entering starts the role as a named task whose crash is reported
(not swallowed), leaving cancels it and waits for the drain, bounded by a timeout so a stuck role
cannot hang a shutdown. A process (``serve.py``) enters its roles and their resources on one
``AsyncExitStack``, so they stop in the reverse order they started: a role is drained before
the backends, connections and the store it uses are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from .tasks import cancel_and_wait

log = logging.getLogger("mlynar.roles")
DRAIN_TIMEOUT = 10.0


class Role(Protocol):
    async def run(self) -> None: ...


@contextlib.asynccontextmanager
async def hosted(name: str, role: Role, on_crash: Callable[[str, BaseException], None],
                 drain_timeout: float = DRAIN_TIMEOUT) -> AsyncIterator[asyncio.Task]:
    """Run ``role`` while the context is open; ``on_crash(name, exc)`` if it ends by an error."""
    task = asyncio.ensure_future(role.run())
    task.set_name(name)

    def done(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("role %s crashed", name, exc_info=t.exception(), extra={"role": name})
            on_crash(name, t.exception())  # type: ignore[arg-type]

    task.add_done_callback(done)
    try:
        yield task
    finally:
        await cancel_and_wait([task], drain_timeout)


def closing(close: Callable[[], Awaitable[Any]], timeout: float = DRAIN_TIMEOUT) -> Callable[[], Awaitable[None]]:
    """``close`` as an exit callback that is bounded and never stops the rest of a shutdown."""

    async def run() -> None:
        try:
            await asyncio.wait_for(close(), timeout)
        except Exception:  # noqa: BLE001 - stopping goes on; the reason is logged
            log.exception("closing %s failed", getattr(close, "__qualname__", close))

    return run
