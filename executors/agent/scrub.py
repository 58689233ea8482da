"""Keep the agent's bearer token out of what other processes can read about the agent.

``/proc/<pid>/environ`` and ``/proc/<pid>/cmdline`` show the environment and arguments the agent
was *started* with: they read the process's memory where ``execve`` put them, so removing
``MLYNAR_TOKEN`` from ``os.environ`` alone does not hide it. :func:`hide_token` therefore also
overwrites every copy of the token in those two memory areas (the token stays in the agent's
heap), and marks the process non-dumpable, which makes its ``/proc`` files and memory
inaccessible to other processes of the same user (``ptrace`` rules) — a step running as the agent's
own user cannot read them. Linux only; elsewhere only ``os.environ`` is cleaned.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("mlynar.agent")

_PR_SET_DUMPABLE = 4
#: Fields of /proc/self/stat (1-based) holding the start and end of argv and of the environment.
_ARG_START, _ARG_END, _ENV_START, _ENV_END = 48, 49, 50, 51


def _areas() -> list[tuple[int, int]]:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state)
    get = lambda n: int(fields[n - 3])  # noqa: E731
    return [(get(_ARG_START), get(_ARG_END)), (get(_ENV_START), get(_ENV_END))]


def overwrite_in_process_memory(secret: bytes) -> int:
    """Replace every copy of ``secret`` in the argv and environment areas by ``*``; how many."""
    if not secret:
        return 0
    n = 0
    for start, end in _areas():
        if end <= start:
            continue
        data = ctypes.string_at(start, end - start)
        at = data.find(secret)
        while at >= 0:
            ctypes.memset(start + at, ord("*"), len(secret))
            n += 1
            at = data.find(secret, at + len(secret))
    return n


def hide_token(token: str | None, env_var: str = "MLYNAR_TOKEN") -> None:
    """Remove the token from this process's environment and from what ``/proc`` shows of it."""
    os.environ.pop(env_var, None)
    if not sys.platform.startswith("linux"):
        return
    if token:
        try:
            n = overwrite_in_process_memory(token.encode("utf-8"))
        except (OSError, ValueError, IndexError) as e:  # pragma: no cover - exotic /proc
            log.warning("could not overwrite the token in the start-up environment: %s", e)
        else:
            if n:
                log.info("the token was removed from the agent's start-up arguments/environment (%d copies)", n)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
