"""The client sub-commands of ``mlynar``: ``apply``, ``get``, ``delete``, ``run …``,
``tokens …`` and ``history``. :func:`add_commands` adds their parsers to the one ``mlynar`` parser
(``mlynar_events/cli.py``); each handler is an ``async`` function of an open :class:`~client.http.Api`
and the parsed arguments, answering the exit code (the table in :mod:`client.http`).

Every command takes ``--api``/``--token-file`` (and their ``MLYNAR_*`` variables, from
:class:`~client.http.ClientSettings`) and ``-o table|json|yaml``; ``-o json`` prints the API's own
answer, so scripts read the documented REST shapes."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from mlynar_events import config

from .http import INTERRUPTED, OK, REFUSED, USAGE, Api, ApiError, ClientSettings, CliError

Handler = Callable[[Api, argparse.Namespace], Awaitable[int]]
GET_WHAT = {"kinds": "kinds", "kind": "kinds", "datakinds": "kinds", "data-kinds": "kinds",
            "operators": "operators", "operator": "operators", "ops": "operators",
            "machines": "machines", "machine": "machines", "runs": "runs", "run": "runs"}
DELETE_PATH = {"kind": "/api/data-kinds/{}", "operator": "/api/operators/{}", "machine": "/api/machines/{}",
               "run": "/api/run/{}"}
SETTLE = 10.0
"""Seconds a final ``-o json`` answer may wait for the read views to reach the last event seen."""


# ---- running a handler ---------------------------------------------------------------------------


def _runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """The handler as ``mlynar``'s ``func``: one event loop, one session, and every failure as
    one line on stderr with its exit code; Ctrl-C while watching leaves the run alone."""

    def run(ns: argparse.Namespace) -> int:
        ns.watching = None
        try:
            settings = ClientSettings(**{name: getattr(ns, name) for name in ClientSettings.model_fields})

            async def main() -> int:
                async with Api(settings) as api:
                    return await handler(api, ns)

            return asyncio.run(main())
        except CliError as exc:
            print(f"mlynar: {exc.message}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            if ns.watching:
                print(f"\nmlynar: stopped watching; run {ns.watching} goes on "
                      f"(mlynar run watch {ns.watching})", file=sys.stderr)
            return INTERRUPTED
        except BrokenPipeError:  # `mlynar get runs | head`: the reader has all it wanted
            return OK

    return run


# ---- registry ----------------------------------------------------------------------------------


async def _apply(api: Api, ns: argparse.Namespace) -> int:
    from . import render
    from .apply import apply, read_documents

    docs, notes = read_documents(ns.file)
    err = render.console(stderr=True)
    for note in notes:
        err.print(f"note: {note}")
    outcomes = await apply(api, docs)
    if ns.output != "table":
        render.emit([o.json() for o in outcomes], ns.output)
    else:
        out = render.console()
        for o in outcomes:
            if o.result == "error":
                continue
            rev = f" (revision {o.revision})" if o.result == "configured" and o.revision else ""
            out.print(f"{o.doc.ref} {o.result}{rev}")
    for o in outcomes:
        if o.result == "error":
            err.print(f"mlynar: {o.doc.ref}: {o.error}", style="red")
    return REFUSED if any(o.result == "error" for o in outcomes) else OK


async def _get(api: Api, ns: argparse.Namespace) -> int:
    from . import render
    from .models import RunSummary

    what = GET_WHAT[ns.what]
    if what == "kinds":
        data = await api.get("/api/data-kinds")
        render.emit(data, ns.output, render.kinds_table(data))
    elif what == "operators":
        data = await api.get("/api/operators")
        render.emit(data, ns.output, render.operators_table(data))
    elif what == "machines":
        data = await api.get("/api/machines")
        render.emit(data, ns.output, render.machines_table(data))
    else:
        data = [r for r in await api.get("/api/runs", limit=ns.limit) if not ns.status or r["status"] == ns.status]
        render.emit(data, ns.output, render.runs_table(RunSummary.model_validate(r) for r in data))
    return OK


async def _delete(api: Api, ns: argparse.Namespace) -> int:
    from . import render

    answer = await api.json("DELETE", DELETE_PATH[ns.what].format(ns.name))
    render.emit(answer, ns.output, f"{ns.what} {ns.name} deleted")
    return OK


# ---- runs --------------------------------------------------------------------------------------


def _uploads(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for value in values:
        kind, sep, path = value.partition("=")
        if not sep or not kind or not path:
            raise CliError(f"--upload {value!r}: expected KIND=PATH", USAGE)
        file = Path(path).expanduser()
        if not file.is_file():
            raise CliError(f"--upload {value!r}: {file} is not a readable file", USAGE)
        out.append((kind, file))
    return out


def _params(values: list[str]) -> dict[str, dict[str, str]]:
    """``OPERATOR.NAME=VALUE`` flags into the API's param pool ``{operator: {name: value}}``."""
    pool: dict[str, dict[str, str]] = {}
    for value in values:
        key, sep, val = value.partition("=")
        op, dot, name = key.partition(".")
        if not sep or not dot or not op or not name:
            raise CliError(f"--param {value!r}: expected OPERATOR.NAME=VALUE", USAGE)
        pool.setdefault(op, {})[name] = val
    return pool


async def _run_snapshot(api: Api, run_id: str) -> Any:
    from .models import Run

    return Run.model_validate(await api.get(f"/api/run/{run_id}"))


async def _settled(api: Api, run_id: str, seq: int) -> Any:
    """The run's JSON once the read views have reached event ``seq`` (what the watcher saw last),
    so ``-o json`` after a watch never shows a state older than the one reported."""
    deadline = time.monotonic() + SETTLE
    delay = 0.02
    while True:
        body = await api.get(f"/api/run/{run_id}")
        if body.get("version", 0) >= seq or time.monotonic() > deadline:
            return body
        await asyncio.sleep(delay)  # the projection catching up, bounded by the deadline
        delay = min(delay * 2, 0.25)


async def _follow(api: Api, ns: argparse.Namespace, run: Any) -> int:
    """Watch ``run`` to its end: the live view on stdout, or on stderr with ``-o json|yaml``
    (whose stdout is the final run's JSON)."""
    from . import render
    from .watch import watch

    ns.watching = run.id
    human = ns.output == "table"
    fold = await watch(api, run, render.console(stderr=not human))
    if not human:
        render.emit(await _settled(api, run.id, fold.seq), ns.output)
    return fold.exit_code()


async def _submit(api: Api, ns: argparse.Namespace) -> int:
    from . import render
    from .models import Run

    uploads, pool = _uploads(ns.upload or []), _params(ns.param or [])
    human = ns.output == "table"
    say = render.console(stderr=not human).print
    run = Run.model_validate(await api.json("POST", "/api/run"))
    say(f"run {run.id} created")
    try:
        for kind, file in uploads:
            unit = await api.upload(f"/api/run/{run.id}/upload/{kind}", file)
            say(f"uploaded {file.name} as {kind} ({unit.get('size')} B, unit {render.short(unit.get('id'))})")
        query = {"maxParallel": ns.max_parallel} if ns.max_parallel else None
        run = Run.model_validate(await api.json("POST", f"/api/run/{run.id}/run", json=pool, params=query))
    except ApiError as exc:
        raise ApiError(exc.status, f"run {run.id}: {exc.error}", exc.detail) from None
    params = " ".join(f"{op}.{k}={v}" for op, kv in sorted(pool.items()) for k, v in sorted(kv.items()))
    say("started" + (f" with {params}" if params else ""))
    if ns.watch:
        return await _follow(api, ns, run)
    if human:
        say(f"follow it: mlynar run watch {run.id}")
    else:
        render.emit(run.model_dump(mode="json"), ns.output)
    return OK


async def _watch(api: Api, ns: argparse.Namespace) -> int:
    return await _follow(api, ns, await _run_snapshot(api, ns.id))


async def _run_get(api: Api, ns: argparse.Namespace) -> int:
    from . import render
    from .models import Run

    body = await api.get(f"/api/run/{ns.id}")
    render.emit(body, ns.output, render.run_view(Run.model_validate(body)))
    return OK


def _find_step(run: Any, wanted: str) -> Any:
    """A step by id, by the id's prefix as tables show it, or by operator when that is unique."""
    by_id = [s for s in run.steps if s.id == wanted] or [s for s in run.steps if s.id.startswith(wanted)]
    if len(by_id) == 1:
        return by_id[0]
    by_op = [s for s in run.steps if s.operator == wanted]
    if len(by_op) == 1:
        return by_op[0]
    if by_op or len(by_id) > 1:
        ids = ", ".join(s.id[:8] for s in by_op or by_id)
        raise CliError(f"{wanted!r} names several steps of run {run.id} ({ids}); give a step id", USAGE)
    raise CliError(f"run {run.id} has no step {wanted!r}", REFUSED)


async def _logs(api: Api, ns: argparse.Namespace) -> int:
    import contextlib

    from .models import FINISHED_STEP
    from .watch import RunFold, events, step_log

    run = await _run_snapshot(api, ns.id)
    step = _find_step(run, ns.step)
    if step.status not in FINISHED_STEP and ns.follow:
        # a step's log is kept when its attempt ends: wait for that on the run's stream
        fold = RunFold(run)
        ns.watching = run.id
        if fold.final is None:
            async with contextlib.aclosing(events(api, run.id, fold.seq)) as stream:
                async for seq, event in stream:
                    done = fold.apply(seq, event)
                    if (done is not None and done.id == step.id) or fold.final is not None:
                        break
        text = await step_log(api, run.id, step.id)
        if text is None:
            raise CliError(f"step {step.id} of run {run.id} has no log", REFUSED)
    else:
        text = await api.text(f"/api/run/{run.id}/steps/{step.id}/logs")
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return OK


def _safe_name(name: str, fallback: str) -> str:
    """A unit's filename as a plain name inside the target directory (the service is trusted to
    send one, but a file name is never allowed to climb out of ``-d``)."""
    base = Path(name.replace("\\", "/")).name
    return base if base not in {"", ".", ".."} else fallback


async def _download(api: Api, ns: argparse.Namespace) -> int:
    from . import render

    run = await _run_snapshot(api, ns.id)
    units = [u for u in run.dataPool if not ns.kind or u.dataKind in ns.kind]
    if not units:
        raise CliError(f"run {run.id} has no data" + (f" of kind {', '.join(ns.kind)}" if ns.kind else ""), REFUSED)
    written = []
    for unit in units:
        folder = ns.dir / unit.dataKind
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / _safe_name(unit.filename, unit.id)
        if dest.exists() and any(w["path"] == str(dest) for w in written):
            dest = dest.with_name(f"{dest.stem}-{unit.id[:8]}{dest.suffix}")
        size = await api.download(f"/static/{run.id}/data/{unit.id}", dest, unit.sha256)
        written.append({"unit": unit.id, "dataKind": unit.dataKind, "path": str(dest), "size": size})
    if ns.output != "table":
        render.emit(written, ns.output)
    else:
        out = render.console()
        for w in written:
            out.print(f"{w['path']}  ({w['size']} B, {w['dataKind']})")
    return OK


async def _terminate(api: Api, ns: argparse.Namespace) -> int:
    from . import render

    body = await api.json("POST", f"/api/run/{ns.id}/terminate", params={"cancel": "true" if ns.cancel else "false"})
    how = "running steps cancelled" if ns.cancel else "running steps finish first"
    render.emit(body, ns.output, f"run {body['id']} {body['status']} ({how})")
    return OK


async def _run_delete(api: Api, ns: argparse.Namespace) -> int:
    from . import render

    body = await api.json("DELETE", f"/api/run/{ns.id}")
    render.emit(body, ns.output, f"run {ns.id} deleted")
    return OK


async def _history(api: Api, ns: argparse.Namespace) -> int:
    from . import render
    from .models import HistoryPage, Run

    if ns.at is not None:
        body = await api.get(f"/api/run/{ns.id}", at=ns.at)
        render.emit(body, ns.output, render.run_view(Run.model_validate(body), at=ns.at))
        return OK
    raw: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:
        page = await api.get(f"/api/run/{ns.id}/history", after=after or None, limit=1000)
        raw.extend(page["events"])
        after = HistoryPage.model_validate(page).next
    events = HistoryPage(events=raw).events
    render.emit({"events": raw}, ns.output, render.history_table(events))
    return OK


# ---- tokens ------------------------------------------------------------------------------------


async def _token_create(api: Api, ns: argparse.Namespace) -> int:
    from . import render

    body = await api.json("POST", "/api/tokens", json={"principal": ns.principal, "role": ns.role,
                                                        "description": ns.description})
    if ns.output != "table":
        render.emit(body, ns.output)
    else:
        render.console().print(f"token {body['id']} for {body['principal']} ({body['role']}); "
                               "it is shown only now, keep it:")
        print(body["token"])  # plain, so `mlynar tokens create ... | tail -1 > file` works
    return OK


async def _token_list(api: Api, ns: argparse.Namespace) -> int:
    from . import render

    data = await api.get("/api/tokens")
    render.emit(data, ns.output, render.tokens_table(data))
    return OK


async def _token_revoke(api: Api, ns: argparse.Namespace) -> int:
    from . import render

    body = await api.json("DELETE", f"/api/tokens/{ns.id}")
    render.emit(body, ns.output, f"token {body['id']} of {body['principal']} revoked")
    return OK


# ---- parsers -----------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """What every client command takes: where the API is, the token, the output format."""
    common = argparse.ArgumentParser(add_help=False)
    config.add_model_flags(common, ClientSettings)
    common.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="output format: a table for people, the API's JSON or YAML for scripts")
    return common


def add_commands(sub: Any) -> None:
    """Add the client commands to ``mlynar``'s sub-parsers."""
    common = _common()

    def leaf(parent: Any, name: str, handler: Handler, help: str, **kw: Any) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, parents=[common], **kw)
        p.set_defaults(func=_runner(handler))
        return p

    p = leaf(sub, "apply", _apply, "declare DataKinds and Operators from YAML (created / configured / unchanged)")
    p.add_argument("-f", "--file", type=Path, action="append", required=True, metavar="FILE_OR_DIR",
                   help="a YAML file or a directory of them (repeatable)")

    p = leaf(sub, "get", _get, "list data kinds, operators, machines or runs")
    p.add_argument("what", choices=sorted(GET_WHAT), metavar="kinds|operators|machines|runs")
    p.add_argument("--limit", type=int, default=None, help="runs: at most this many, newest first")
    p.add_argument("--status", default=None, help="runs: only those with this status")

    p = leaf(sub, "delete", _delete, "delete a data kind, an operator, a machine or a run")
    p.add_argument("what", choices=sorted(DELETE_PATH), metavar="kind|operator|machine|run")
    p.add_argument("name", help="its name (a run: its id)")

    run = sub.add_parser("run", help="submit, watch and inspect runs").add_subparsers(dest="run_command", required=True)
    p = leaf(run, "submit", _submit, "create a run, upload its data, start it (--watch: follow it to the end)")
    p.add_argument("--upload", action="append", metavar="KIND=PATH", help="a file for the pool as a data kind (repeatable)")
    p.add_argument("--param", action="append", metavar="OPERATOR.NAME=VALUE",
                   help="a configurable parameter of an operator (repeatable)")
    p.add_argument("--max-parallel", type=int, default=None, help="this run's limit of running steps")
    p.add_argument("--watch", action="store_true",
                   help="show live progress until the run ends; exit 0 if every step succeeded, 1 if one failed, "
                        "3 if the run was terminated")
    p = leaf(run, "watch", _watch, "live progress of a run until it ends (exit code as submit --watch)")
    p.add_argument("id", help="run id")
    p = leaf(run, "get", _run_get, "a run: status, steps, data pool")
    p.add_argument("id", help="run id")
    p = leaf(run, "logs", _logs, "a step's log (STEP: step id, its first characters, or a unique operator name)")
    p.add_argument("id", help="run id")
    p.add_argument("step", help="step id or operator")
    p.add_argument("-f", "--follow", action="store_true",
                   help="wait for a running step to finish, then print its log (logs are kept when a step ends)")
    p = leaf(run, "download", _download, "download a run's data units into DIR/<kind>/<file>")
    p.add_argument("id", help="run id")
    p.add_argument("--kind", action="append", help="only units of this data kind (repeatable)")
    p.add_argument("-d", "--dir", type=Path, default=Path("."), help="target directory (default: the current one)")
    p = leaf(run, "terminate", _terminate, "stop scheduling new steps of a run")
    p.add_argument("id", help="run id")
    p.add_argument("--cancel", action="store_true", help="also cancel the running steps")
    p = leaf(run, "delete", _run_delete, "delete a finished run and its data")
    p.add_argument("id", help="run id")

    tokens = sub.add_parser("tokens", help="API tokens of principals (admin)").add_subparsers(
        dest="tokens_command", required=True)
    p = leaf(tokens, "create", _token_create, "create a token for a principal with a role (printed once)")
    p.add_argument("principal", help="who it is for (a DNS-1123 label)")
    p.add_argument("--role", choices=("admin", "member", "viewer"), default="member",
                   help="viewer: read; member: own runs and machines; admin: everything (default: member)")
    p.add_argument("--description", default="", help="what it is for")
    leaf(tokens, "list", _token_list, "the tokens (never the tokens themselves)")
    p = leaf(tokens, "revoke", _token_revoke, "revoke a token (refused from then on)")
    p.add_argument("id", help="token id (tok-...)")

    p = leaf(sub, "history", _history, "a run's events as a timeline (--at SEQ: the run as it was after that event)")
    p.add_argument("id", metavar="RUN", help="run id")
    p.add_argument("--at", type=int, default=None, metavar="SEQ", help="show the run as it was right after event SEQ")
