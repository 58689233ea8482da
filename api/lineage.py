"""A run's data flow: ``GET /api/run/{id}/lineage`` and ``.../units/{unit_id}/provenance``, from
the run's fold (:mod:`mlynar_events.lineage`)."""

from __future__ import annotations

from aiohttp import web

from mlynar_events import runs as commands
from mlynar_events.errors import NotFound
from mlynar_events.lineage import lineage, provenance

from .context import ctx
from .principal import route_run


async def get_lineage(request: web.Request) -> web.Response:
    state = await commands.load_run(ctx(request).runs, await route_run(request))
    return web.json_response(lineage(state).model_dump(mode="json"))


async def get_provenance(request: web.Request) -> web.Response:
    state = await commands.load_run(ctx(request).runs, await route_run(request))
    unit_id = request.match_info["unit_id"]
    found = provenance(state, unit_id)
    if found is None:
        raise NotFound(f"data unit {unit_id!r} of run {state.run_id!r} does not exist")
    return web.json_response(found.model_dump(mode="json"))
