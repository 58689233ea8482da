"""Stopping asyncio tasks for sure.

On Python 3.11, ``asyncio.wait_for`` (used throughout nats-py) can swallow a cancellation that
arrives just as its inner future completes (gh-86296): a role's loop then goes on as if nothing
happened and ``task.cancel(); await task`` waits forever. So we cancel again until the task is
done, and give up loudly after a timeout instead of hanging a shutdown.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Iterable

log = logging.getLogger("mlynar.tasks")


async def cancel_and_wait(tasks: Iterable[asyncio.Task], timeout: float = 10.0) -> set[asyncio.Task]:
    """Cancel ``tasks`` (again every 0.2 s) until they are done; returns (and logs with their
    stacks) those still running after ``timeout``."""
    loop = asyncio.get_running_loop()
    pending = {t for t in tasks if not t.done()}
    deadline = loop.time() + timeout
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    for task in pending:
        out = io.StringIO()
        task.print_stack(file=out)
        log.error("task %s did not stop within %ss:\n%s", task.get_name(), timeout, out.getvalue())
    return pending
