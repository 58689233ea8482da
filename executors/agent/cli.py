"""Command line of ``mlynar machine-agent`` (also ``python -m executors.agent``).

Every flag has a ``MLYNAR_*`` environment variable of the same name (``--token-file`` <->
``MLYNAR_TOKEN_FILE``); prefer ``MLYNAR_TOKEN`` or ``--token-file`` over ``--token`` so the token
does not show up in the process list. ``MLYNAR_ALLOW`` is a comma-separated list of patterns."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import typing

from mlynar_events.config import add_model_flags, flag, resolve_repeats

from . import __version__
from .app import start_agent
from .scrub import hide_token
from .settings import AgentConfigError, AgentSettings, MachineAgentSettings

log = logging.getLogger("mlynar.agent")

EXIT_CONFIG = 2


NOT_FLAGS = ("max_manifest_bytes", "kill_grace")
"""AgentSettings fields only an embedding program sets."""


def _isolation(text: str) -> str:
    choices = typing.get_args(AgentSettings.model_fields["isolation"].annotation)
    if text not in choices:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, not {text!r}")
    return text


def add_agent_flags(p: argparse.ArgumentParser) -> None:
    """The fields of MachineAgentSettings as flags (the token parsed as plain text: an empty one is
    refused by :meth:`AgentSettings.resolve_token`), plus the log level."""
    add_model_flags(p, MachineAgentSettings, skip=NOT_FLAGS, parsers={"token": str, "isolation": _isolation})
    flag(p, "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlynar machine-agent",
        description="Run Mlynar steps on this host for a Mlynar Events executor (protocol /v1).",
    )
    add_agent_flags(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def settings_from_args(ns: argparse.Namespace) -> AgentSettings:
    ns = resolve_repeats(ns)
    if ns.max_parallel is not None and ns.max_parallel < 1:
        raise AgentConfigError(f"--max-parallel must be at least 1, got {ns.max_parallel}")
    if ns.max_input_bytes is not None and ns.max_input_bytes < 0:
        raise AgentConfigError(f"--max-input-bytes must not be negative, got {ns.max_input_bytes}")
    if not 0 <= ns.port <= 65535:
        raise AgentConfigError(f"--port must be between 0 and 65535, got {ns.port}")
    values = {k: getattr(ns, k) for k in MachineAgentSettings.model_fields if k not in NOT_FLAGS}
    values["token"] = ns.token or None
    for repeated in ("allow", "read", "write"):
        values[repeated] = list(values[repeated] or [])
    try:
        return MachineAgentSettings(**values)
    except ValueError as e:  # pydantic's ValidationError: a value out of range
        raise AgentConfigError(str(e)) from None


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=getattr(logging, level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(settings: AgentSettings) -> int:
    """Run an agent until SIGINT/SIGTERM; prints "mlynar machine-agent listening on URL" to stdout.

    The token is removed from this process's environment and start-up memory first
    (:func:`.scrub.hide_token`), so a step cannot read it from ``/proc/<agent>/environ``."""
    hide_token(settings.resolve_token())
    agent = await start_agent(settings)
    print(f"mlynar machine-agent listening on {agent.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
            pass
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await agent.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except (ValueError, TypeError) as e:  # a MLYNAR_* variable that does not parse
        print(f"mlynar machine-agent: error: invalid MLYNAR_* environment variable: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_CONFIG
    _setup_logging(ns.log_level)
    try:
        settings = settings_from_args(ns)
        return asyncio.run(serve(settings))
    except AgentConfigError as e:
        print(f"mlynar machine-agent: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"mlynar machine-agent: error: cannot listen on {ns.host}:{ns.port}: {e.strerror or e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
