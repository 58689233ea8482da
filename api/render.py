"""How the API renders what the views hold: runs, units, steps and blob downloads. One renderer
per shape; a run's JSON is built by SQLite itself (:func:`projections.queries.run_body`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mlynar_events.errors import NotFound
from mlynar_events.names import job_name, pvc_name
from projections import queries

from .context import ApiContext
from .models import DataUnitOut, StepCounts, StepOut


def base_url(request: web.Request, c: ApiContext) -> str:
    """Where clients fetch units: ``--public-url``, else the request's own origin, whose Host
    the door (``api/door.py``) has already checked is a name this service answers for."""
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


async def blob_response(c: ApiContext, key: str, filename: str, content_type: str = "application/octet-stream") -> web.StreamResponse:
    path = c.blobs.local_path(key)
    if path is None:
        raise NotFound("the data is gone from the blob store")
    return web.FileResponse(path, headers={
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Content-Type": content_type,
    })
