"""Run routes: create, upload, params, run, terminate, delete, read, data and step logs.

The handlers parse the request, call the run's commands (:mod:`mlynar_events.runs`, which decide
from the stream and append) and render (:mod:`api.render`). Reads come from the projection, after waiting for the
command's own append (read-your-writes)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web

from mlynar_events import runs as commands
from mlynar_events.blobs import BlobTooLarge, unit_key
from mlynar_events.errors import NotFound
from mlynar_events.events import DataUnitAdded
from mlynar_events.names import is_dns1123_label
from mlynar_events.registry import load_registry
from projections import queries

from . import events
from .body import BodyClock
from .context import ctx
from .errors import BadRequest, CommandTooLarge, int_param, json_body
from .models import RunSummary
from .principal import actor, owner_filter, route_run, visible_run
from .render import base_url, blob_response, counts, ok, run_response, step_out, unit_out
from .uploads import MULTIPART_ERRORS, file_chunks, first_file_part, safe_filename

log = logging.getLogger("mlynar.api.runs")
MAX_OFFSET = 2**31


async def create_run(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id, seq = await commands.create(c.store, actor(request))
    await c.caught_up(seq)
    log.info("run created", extra={"run_id": run_id})
    return await run_response(request, c, run_id, 201)


async def list_runs(request: web.Request) -> web.Response:
    c = ctx(request)
    limit = int_param(request, "limit", 1, 1000, default=100)
    offset = int_param(request, "offset", 0, MAX_OFFSET, default=0)
    rows = await queries.list_runs(c.db, limit, offset, owner=owner_filter(request))
    return web.json_response([
        RunSummary(id=r["id"], status=r["status"], owner=r["owner"], stepCounts=counts(r), createdAt=r["created_at"],
                   updatedAt=r["updated_at"]).model_dump(mode="json") for r in rows
    ])


async def get_run(request: web.Request) -> web.Response:
    """The hottest read: JSON text straight from the views, no pydantic, no ``json.dumps``;
    with ``?at=<seq>``, the run as it was then (:func:`api.events.run_at`)."""
    if "at" in request.query:
        return await events.run_at(request)
    return await run_response(request, ctx(request), await route_run(request))


async def upload(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id, kind = await route_run(request), request.match_info["data_kind"]
    if not is_dns1123_label(kind):
        raise BadRequest(f"{kind!r} is not a valid data kind name (DNS-1123 label)")
    if request.content_length is not None and request.content_length > c.settings.max_upload_bytes + 64 * 1024:
        raise CommandTooLarge(c.settings.max_upload_bytes)
    commands.check_upload_allowed(await commands.load_run(c.runs, run_id))
    kinds = {k["name"] for k in await queries.data_kinds(c.db)}
    if kind not in kinds:
        raise NotFound(f"data kind {kind!r} is not declared")
    clock = BodyClock(request, c.settings)
    reader, part = await first_file_part(request, clock)
    unit_id = str(uuid.uuid4())
    key = unit_key(run_id, unit_id)
    try:
        info = await c.blobs.put_stream(key, file_chunks(reader, part, clock), max_bytes=c.settings.max_upload_bytes)
    except BlobTooLarge:
        raise CommandTooLarge(c.settings.max_upload_bytes) from None
    except MULTIPART_ERRORS as exc:
        raise BadRequest("malformed multipart body", str(exc)) from None
    # the bytes are durable before the event that points at them is appended
    event = DataUnitAdded(run_id=run_id, unit_id=unit_id, data_kind=kind, ancestors=[], blob=key,
                          size=info.size, sha256=info.sha256, filename=safe_filename(part.filename))
    try:
        seq = await commands.add_uploaded_unit(c.store, c.runs, event, actor(request))
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
    run_id = await route_run(request)
    found = await queries.get_run(c.db, run_id)
    if found is None:
        raise NotFound(f"run {run_id!r} does not exist")
    registry = await load_registry(c.store)
    kinds = {u["data_kind"] for u in found["units"]}
    out = {
        op: [{"name": e.name, "defaultValue": e.defaultValue} for e in registry.operators[op][0].configurableEnv]
        for op in registry.reachable_operators(kinds)
        if registry.operators[op][0].configurableEnv  # as the original: operators without parameters are left out
    }
    return web.json_response(out)


async def start_run(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id = await route_run(request)
    max_parallel = int_param(request, "maxParallel", 1, 10_000, default=c.settings.max_parallel)
    await commands.load_run(c.runs, run_id)  # 404 before reading the body
    pool = commands.parse_param_pool(await json_body(request, required=False), await load_registry(c.store))
    await c.caught_up(await commands.start(c.store, c.runs, run_id, pool, max_parallel, actor(request)))
    log.info("run started", extra={"run_id": run_id, "max_parallel": max_parallel})
    return await run_response(request, c, run_id)


async def terminate_run(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id = await route_run(request)
    cancel = request.query.get("cancel", "false").lower()
    if cancel not in {"true", "false", "1", "0"}:
        raise BadRequest("cancel must be true or false")

    await c.caught_up(await commands.terminate(c.store, c.runs, run_id, cancel in {"true", "1"}, actor(request)))
    log.info("run termination requested", extra={"run_id": run_id, "cancel": cancel})
    return await run_response(request, c, run_id)


async def delete_run(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id = await route_run(request)

    await c.caught_up(await commands.delete(c.store, c.runs, c.blobs, run_id, actor(request)))
    log.info("run deleted", extra={"run_id": run_id})
    return web.json_response({"id": run_id, "deleted": True})


async def unit_data(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    run_id, unit_id = request.match_info.get("run_id"), request.match_info["unit_id"]
    unit = await queries.get_unit(c.db, run_id, unit_id)
    missing = NotFound(f"data unit {unit_id!r}" + (f" of run {run_id!r}" if run_id else "") + " does not exist")
    if unit is None:
        raise missing
    try:
        await visible_run(request, unit["run_id"])
    except NotFound:
        raise missing from None
    return await blob_response(c, unit["blob"], unit["filename"])


async def _step(request: web.Request) -> dict[str, Any]:
    """The route's step from the views, or 404."""
    run_id, step_id = await route_run(request), request.match_info["step_id"]
    step = await queries.get_step(ctx(request).db, run_id, step_id)
    if step is None:
        raise NotFound(f"step {step_id!r} of run {run_id!r} does not exist")
    return step


async def step_logs(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    wanted = int_param(request, "attempt", 1, 1000, default=0) or None
    step = await _step(request)
    step_id = step["id"]
    attempts = [a for a in step["attempts"] if a["logs_blob"]]
    if wanted is not None:
        attempts = [a for a in attempts if a["attempt"] == wanted]
    if not attempts:
        raise NotFound(f"no logs for step {step_id!r} yet" + (f" (attempt {wanted})" if wanted else ""))
    return await blob_response(c, attempts[-1]["logs_blob"], f"{step_id}-{attempts[-1]['attempt']}.log",
                                "text/plain; charset=utf-8")


async def get_step(request: web.Request) -> web.Response:
    c = ctx(request)
    step = await _step(request)
    body = step_out(base_url(request, c), step).model_dump(mode="json")
    body["attempts"] = step["attempts"]
    return web.json_response(body)
