"""``mlynar``: the one command. ``serve`` runs the service (all roles, or those of ``--roles``),
``machine-agent`` runs the agent on a user's host, ``projections rebuild`` rebuilds the read views
from the stream, ``example`` runs Mlynar's README example against a running service; ``apply``,
``get``, ``delete``, ``run …`` and ``history`` are the client (package ``client``), talking to a
service over its REST API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any, AsyncIterator, Awaitable, Callable

from . import config, logs


def _serve(ns: argparse.Namespace) -> int:
    from .serve import ConfigError, Service, serve_forever

    settings = config.serve_settings(ns)
    logs.setup(settings.log_level, settings.log_format)

    async def example(service: Service) -> None:
        from .example import run_example

        assert service.api_url is not None
        await run_example(service.api_url, None)

    try:
        return asyncio.run(serve_forever(settings, example if ns.run_example else None))
    except ConfigError as exc:
        print(f"mlynar serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


@contextlib.asynccontextmanager
async def _offline_store(settings: config.ServeSettings, *, lock: bool) -> AsyncIterator[Any]:
    """The event store reached exactly as ``serve`` reaches it (the embedded server with its
    generated NKey, or ``--nats-url`` with its credential flags), for a maintenance command.
    ``lock``: hold the data directory's lock (the service must be stopped)."""
    from .serve import lock_data_dir, start_nats
    from .store import EventStore

    held = lock_data_dir(settings.data_dir) if lock else None
    nats = None
    try:
        options, nats = await start_nats(settings)
        store = await EventStore.connect(options)
        try:
            yield store
        finally:
            await store.close()
    finally:
        if nats:
            await nats.stop()
        if held:
            await held.release()


def _run_command(name: str, main: Callable[[], Awaitable[int]]) -> int:
    """Run a maintenance command; a setting that must not start (exit 2) or an unreachable NATS
    (exit 1) is one line, not a traceback."""
    from .nats_connect import NatsUnavailable
    from .serve import ConfigError

    try:
        return asyncio.run(main())
    except ConfigError as exc:
        print(f"mlynar {name}: {exc}", file=sys.stderr)
        return 2
    except NatsUnavailable as exc:
        print(f"mlynar {name}: {exc}", file=sys.stderr)
        return 1


def _rebuild(ns: argparse.Namespace) -> int:
    """Rebuild the projection file from the stream, holding the data directory's lock (the
    service must be stopped)."""
    from projections.projector import rebuild

    from .serve import private_files

    settings = config.serve_settings(ns)
    logs.setup(settings.log_level, settings.log_format)

    async def main() -> int:
        async with _offline_store(settings, lock=True) as store:
            private_files(settings)

            def progress(seq: int, head: int) -> None:
                print(f"\rrebuilt {seq}/{head} events", end="", file=sys.stderr, flush=True)

            n = await rebuild(store, settings.resolved_db_path, progress)
            settings.resolved_db_path.chmod(0o600)  # the fresh file is the owner's only, too
            print(f"\nrebuilt {settings.resolved_db_path} from {n} events", file=sys.stderr)
            return 0

    return _run_command("projections rebuild", main)


def _audit(ns: argparse.Namespace) -> int:
    """``mlynar audit verify``: replay the stream into a fresh projection and compare it with the
    live one, and re-derive every run's scheduling from its history (:mod:`mlynar_events.audit`,
    :mod:`projections.audit`). One line per discrepancy; exit 1 if there is any. With the
    embedded NATS the service must be stopped (the data directory's lock); with ``--nats-url`` it
    may run (the live database is read in one read transaction)."""
    import tempfile
    from pathlib import Path

    from projections.audit import verify_views

    from .audit import check_scheduling
    from .events import SUBJECT_PREFIX
    from .serve import ConfigError

    settings = config.serve_settings(ns)
    logs.setup(settings.log_level, settings.log_format)

    async def main() -> int:
        if not settings.resolved_db_path.exists():
            raise ConfigError(f"no projection at {settings.resolved_db_path} to verify")
        async with _offline_store(settings, lock=not settings.store.nats_url) as store:
            with tempfile.TemporaryDirectory(prefix="mlynar-audit-") as work:
                views, at = await verify_views(store, settings.resolved_db_path, Path(work))
            events = await store.read(f"{SUBJECT_PREFIX}.>")
        scheduling, runs = check_scheduling(events)
        for finding in views + scheduling:
            print(finding)
        verdict = "FAILED" if views or scheduling else "ok"
        print(f"audit {verdict}: views at sequence {at}: {len(views)} discrepancies; "
              f"{len(events)} events, {runs} runs re-derived: {len(scheduling)} discrepancies", file=sys.stderr)
        return 1 if views or scheduling else 0

    return _run_command("audit verify", main)


def _example(ns: argparse.Namespace) -> int:
    from .example import run_example

    token = ns.api_token_file.read_text().strip() if ns.api_token_file else None
    return asyncio.run(run_example(ns.url, token))


def _agent(argv: list[str]) -> int:
    from executors.agent.cli import main as agent_main

    return agent_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlynar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service (embedded NATS unless --nats-url)")
    config.add_serve_flags(serve)
    serve.add_argument("--run-example", action="store_true",
                       help="after start, run Mlynar's README example against this service and print the result")
    serve.set_defaults(func=_serve)
    sub.add_parser("machine-agent", help="run the machine agent (see 'mlynar machine-agent --help')", add_help=False)
    proj = sub.add_parser("projections", help="projection maintenance")
    proj_sub = proj.add_subparsers(dest="action", required=True)
    rebuild = proj_sub.add_parser("rebuild", help="rebuild the read views from sequence 1 (service stopped)")
    config.add_serve_flags(rebuild)
    rebuild.set_defaults(func=_rebuild)
    audit = sub.add_parser("audit", help="audit the stream and the views")
    audit_sub = audit.add_subparsers(dest="action", required=True)
    verify = audit_sub.add_parser("verify", help="replay into a fresh projection, compare it with the live one and "
                                  "re-derive every run's scheduling; exit 1 on any discrepancy")
    config.add_serve_flags(verify)
    verify.set_defaults(func=_audit)
    example = sub.add_parser("example", help="run Mlynar's README example against a running service")
    config.flag(example, "--url", default="http://127.0.0.1:3000", help="the service's base URL")
    config.flag(example, "--api-token-file", default=None, type=__import__("pathlib").Path, help="bearer token file")
    example.set_defaults(func=_example)
    from client.commands import add_commands  # the client commands: apply, get, delete, run, history

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["machine-agent"]:
        return _agent(argv[1:])
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
