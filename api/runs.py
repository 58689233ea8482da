"""Run routes: create, upload, params, run, terminate, delete, read, data and step logs.

The handlers parse the request, call the run's commands (:mod:`mlynar_events.runs`, which decide
from the stream and append) and render. Reads come from the projection, after waiting for the
command's own append (read-your-writes)."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from mlynar_events import runs as commands
from mlynar_events.blobs import BlobTooLarge, unit_key
from mlynar_events.errors import NotFound
from mlynar_events.events import DataUnitAdded, Event
from mlynar_events.names import is_dns1123_label, job_name, pvc_name
from mlynar_events.registry import Registry, load_registry
from mlynar_events.runstate import RunState
from projections import queries

from .context import ApiContext, ctx
from .errors import BadRequest, CommandTooLarge, json_body
from .models import DataUnitOut, ParamIn, RunSummary, StepCounts, StepOut

log = logging.getLogger("mlynar.api.runs")


def _actor(request: web.Request) -> str:
    return f"api:{request.remote or 'unknown'}"


def _run_id(request: web.Request) -> str:
    run_id = request.match_info["run_id"]
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        raise NotFound(f"run {run_id!r} does not exist") from None


async def load_run(c: ApiContext, run_id: str) -> RunState:
    return await commands.load_run(c.runs, run_id)


async def decide_and_append(
    c: ApiContext, run_id: str, decide: Callable[[RunState], Event | None], actor: str,
    msg_id: str | None = None,
) -> tuple[RunState, int | None]:
    return await commands.decide_and_append(c.store, c.runs, run_id, decide, actor, msg_id)


# ---- rendering --------------------------------------------------------------------------------


def base_url(request: web.Request, c: ApiContext) -> str:
    return (c.settings.public_url or f"{request.scheme}://{request.host}").rstrip("/")


def unit_out(base: str, u: dict[str, Any]) -> DataUnitOut:
    return DataUnitOut(
        id=u["id"], dataKind=u["data_kind"], ancestors=u["ancestors"],
        url=f"{base}/static/{u['run_id']}/data/{u['id']}", size=u["size"], sha256=u["sha256"],
        filename=u["filename"], stepId=u["step_id"],
    )


def step_out(base: str, s: dict[str, Any]) -> StepOut:
    return StepOut(
        id=s["id"], jobName=job_name(s["id"]), pvcName=pvc_name(job_name(s["id"])),
        operator=s["operator"], status=s["status"], inputDataUnits=s["inputs"],
        outputDataUnits=s["outputs"], revision=s["revision"], attempt=s["attempt"],
        target=s["target"], error=s["error"],
        logsUrl=f"{base}/api/run/{s['run_id']}/steps/{s['id']}/logs",
        scheduledAt=s["scheduled_at"], startedAt=s["started_at"], finishedAt=s["finished_at"],
    )


def counts(run: dict[str, Any]) -> StepCounts:
    done = run["steps_succeeded"] + run["steps_failed"] + run["steps_cancelled"]
    return StepCounts(total=run["steps_total"], succeeded=run["steps_succeeded"], failed=run["steps_failed"],
                      cancelled=run["steps_cancelled"], active=run["steps_total"] - done)


async def run_response(request: web.Request, c: ApiContext, run_id: str, status: int = 200) -> web.Response:
    """A run as every route answers it (``RunOut``'s shape). One renderer: the JSON text SQLite
    builds from the views (:func:`projections.queries.run_body`), for ``GET`` and the commands
    alike."""
    body = await queries.run_body(c.db, run_id, base_url(request, c))
    if body is None:
        raise NotFound(f"run {run_id!r} does not exist")
    return web.Response(text=body, status=status, content_type="application/json")


def ok(model: Any, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


# ---- handlers ---------------------------------------------------------------------------------


async def create_run(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id, seq = await commands.create(c.store, _actor(request))
    await c.caught_up(seq)
    log.info("run created", extra={"run_id": run_id})
    return await run_response(request, c, run_id, 201)


async def list_runs(request: web.Request) -> web.Response:
    c = ctx(request)
    try:
        limit = min(max(int(request.query.get("limit", 100)), 1), 1000)
        offset = max(int(request.query.get("offset", 0)), 0)
    except ValueError:
        raise BadRequest("limit and offset must be integers") from None
    rows = await queries.list_runs(c.db, limit, offset)
    return web.json_response([
        RunSummary(id=r["id"], status=r["status"], stepCounts=counts(r), createdAt=r["created_at"],
                   updatedAt=r["updated_at"]).model_dump(mode="json") for r in rows
    ])


async def get_run(request: web.Request) -> web.Response:
    """The hottest read: JSON text straight from the views, no pydantic, no ``json.dumps``."""
    return await run_response(request, ctx(request), _run_id(request))


async def _first_file_part(request: web.Request) -> BodyPartReader:
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("expected a multipart/form-data body with one file part")
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                raise BadRequest("the multipart body has no file part")
            if isinstance(part, BodyPartReader) and part.filename is not None:
                return part
            if isinstance(part, BodyPartReader):
                await part.release()
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        raise BadRequest("malformed multipart body", str(exc)) from None


def _safe_filename(name: str | None) -> str:
    base = (name or "data").replace("\\", "/").rsplit("/", 1)[-1].strip()
    cleaned = "".join(ch for ch in base if ch.isalnum() or ch in "._-")[:128].lstrip(".")
    return cleaned or "data"


async def upload(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id, kind = _run_id(request), request.match_info["data_kind"]
    if not is_dns1123_label(kind):
        raise BadRequest(f"{kind!r} is not a valid data kind name (DNS-1123 label)")
    if request.content_length is not None and request.content_length > c.settings.max_upload_bytes + 64 * 1024:
        raise CommandTooLarge(c.settings.max_upload_bytes)
    commands.check_upload_allowed(await load_run(c, run_id))
    kinds = {k["name"] for k in await queries.data_kinds(c.db)}
    if kind not in kinds:
        raise NotFound(f"data kind {kind!r} is not declared")
    part = await _first_file_part(request)
    unit_id = str(uuid.uuid4())
    key = unit_key(run_id, unit_id)

    async def chunks():  # type: ignore[no-untyped-def]
        while chunk := await part.read_chunk(1024 * 1024):
            yield chunk

    try:
        info = await c.blobs.put_stream(key, chunks(), max_bytes=c.settings.max_upload_bytes)
    except BlobTooLarge:
        raise CommandTooLarge(c.settings.max_upload_bytes) from None
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        raise BadRequest("malformed multipart body", str(exc)) from None
    # the bytes are durable before the event that points at them is appended
    event = DataUnitAdded(run_id=run_id, unit_id=unit_id, data_kind=kind, ancestors=[], blob=key,
                          size=info.size, sha256=info.sha256, filename=_safe_filename(part.filename))
    try:
        seq = await commands.add_uploaded_unit(c.store, c.runs, event, _actor(request))
    except BaseException:
        await c.blobs.delete_prefix(key)
        raise
    await c.caught_up(seq)
    log.info("data unit uploaded", extra={"run_id": run_id, "unit_id": unit_id, "kind": kind, "size": info.size})
    unit = await queries.get_unit(c.db, run_id, unit_id)
    assert unit is not None
    return ok(unit_out(base_url(request, c), unit), 201)


async def params(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id = _run_id(request)
    found = await queries.get_run(c.db, run_id)
    if found is None:
        raise NotFound(f"run {run_id!r} does not exist")
    registry = await load_registry(c.store)
    kinds = {u["data_kind"] for u in found["units"]}
    out = {
        op: [{"name": e.name, "defaultValue": e.defaultValue} for e in registry.operators[op][0].configurableEnv]
        for op in registry.reachable_operators(kinds)
    }
    return web.json_response(out)


def parse_param_pool(body: Any, registry: Registry) -> dict[str, dict[str, str]]:
    """Mlynar's ``{op: [{name, value, defaultValue}]}`` (or ``{op: {name: value}}``) into
    ``{op: {name: value}}``; unknown operators and parameters are 400s."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the param pool must be a JSON object keyed by operator name")
    pool: dict[str, dict[str, str]] = {}
    problems = []
    for op, params_ in body.items():
        if op not in registry.operators:
            problems.append(f"unknown operator {op!r}")
            continue
        known = {e.name for e in registry.operators[op][0].configurableEnv}
        if isinstance(params_, dict):
            items = [ParamIn(name=k, value=v) for k, v in params_.items()]
        elif isinstance(params_, list):
            try:
                items = [ParamIn.model_validate(p) for p in params_]
            except Exception as exc:  # pydantic error: wrong element shape
                problems.append(f"{op}: malformed parameter list ({str(exc).splitlines()[0]})")
                continue
        else:
            problems.append(f"{op}: parameters must be a list or an object")
            continue
        values = {}
        for p in items:
            if p.name not in known:
                problems.append(f"operator {op!r} has no configurable parameter {p.name!r} (has {sorted(known)})")
            elif p.value is not None:
                values[p.name] = str(p.value).lower() if isinstance(p.value, bool) else str(p.value)
        pool[op] = values
    if problems:
        raise BadRequest("invalid param pool", problems)
    return pool


async def start_run(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id = _run_id(request)
    try:
        max_parallel = int(request.query.get("maxParallel", c.settings.max_parallel))
    except ValueError:
        raise BadRequest("maxParallel must be an integer") from None
    if not 1 <= max_parallel <= 10_000:
        raise BadRequest("maxParallel must be between 1 and 10000")
    await load_run(c, run_id)  # 404 before reading the body
    pool = parse_param_pool(await json_body(request, required=False), await load_registry(c.store))
    await c.caught_up(await commands.start(c.store, c.runs, run_id, pool, max_parallel, _actor(request)))
    log.info("run started", extra={"run_id": run_id, "max_parallel": max_parallel})
    return await run_response(request, c, run_id)


async def terminate_run(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id = _run_id(request)
    cancel = request.query.get("cancel", "false").lower()
    if cancel not in {"true", "false", "1", "0"}:
        raise BadRequest("cancel must be true or false")

    await c.caught_up(await commands.terminate(c.store, c.runs, run_id, cancel in {"true", "1"}, _actor(request)))
    log.info("run termination requested", extra={"run_id": run_id, "cancel": cancel})
    return await run_response(request, c, run_id)


async def delete_run(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id = _run_id(request)

    await c.caught_up(await commands.delete(c.store, c.runs, c.blobs, run_id, _actor(request)))
    log.info("run deleted", extra={"run_id": run_id})
    return web.json_response({"id": run_id, "deleted": True})


async def unit_data(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    run_id, unit_id = request.match_info["run_id"], request.match_info["unit_id"]
    unit = await queries.get_unit(c.db, run_id, unit_id)
    if unit is None:
        raise NotFound(f"data unit {unit_id!r} of run {run_id!r} does not exist")
    return await _blob_response(c, unit["blob"], unit["filename"])


async def _blob_response(c: ApiContext, key: str, filename: str, content_type: str = "application/octet-stream") -> web.StreamResponse:
    path = c.blobs.local_path(key)
    if path is None:
        raise NotFound("the data is gone from the blob store")
    return web.FileResponse(path, headers={
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Content-Type": content_type,
    })


async def step_logs(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    run_id, step_id = _run_id(request), request.match_info["step_id"]
    step = await queries.get_step(c.db, run_id, step_id)
    if step is None:
        raise NotFound(f"step {step_id!r} of run {run_id!r} does not exist")
    attempts = [a for a in step["attempts"] if a["logs_blob"]]
    wanted = request.query.get("attempt")
    if wanted is not None:
        attempts = [a for a in attempts if str(a["attempt"]) == wanted]
    if not attempts:
        raise NotFound(f"no logs for step {step_id!r} yet" + (f" (attempt {wanted})" if wanted else ""))
    return await _blob_response(c, attempts[-1]["logs_blob"], f"{step_id}-{attempts[-1]['attempt']}.log",
                                "text/plain; charset=utf-8")


async def get_step(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id, step_id = _run_id(request), request.match_info["step_id"]
    step = await queries.get_step(c.db, run_id, step_id)
    if step is None:
        raise NotFound(f"step {step_id!r} of run {run_id!r} does not exist")
    body = step_out(base_url(request, c), step).model_dump(mode="json")
    body["attempts"] = step["attempts"]
    return web.json_response(body)
