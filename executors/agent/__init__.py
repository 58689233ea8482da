"""The machine agent (``mlynar machine-agent``): a small aiohttp service on a user's host that
runs steps, nothing else. See docs/ARCHITECTURE.md ("Roles") and :mod:`executors.agent.app` for the protocol.

Modules: :mod:`.models` (wire models), :mod:`.settings` (configuration), :mod:`.sandbox` (on-disk
layout, checked file access), :mod:`.allow` (what a step may run), :mod:`.isolation` (sandbox
view, user, limits, killing a step's process tree; :mod:`.shim` anchors a tree without bwrap),
:mod:`.scrub` (the token out of /proc), :mod:`.runner` (steps, timeouts, outputs, restarts),
:mod:`.app` (HTTP API and :func:`start_agent`), :mod:`.cli` (flags and ``main``). What the isolation
does and does not guarantee: docs/AGENT.md.
"""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    __version__ = _dist_version("mlynar-events")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

from .app import RunningAgent, start_agent  # noqa: E402
from .settings import AgentConfigError, AgentSettings  # noqa: E402

__all__ = ["AgentConfigError", "AgentSettings", "RunningAgent", "start_agent", "__version__"]
