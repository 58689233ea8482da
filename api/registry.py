"""Data kind and operator routes: Mlynar's CRD documents as JSON, declared as events.

Lists answer a superset of the original Mlynar's: its top-level fields (``name``,
``displayName`` for kinds; ``name`` and the spec's fields for operators) beside the whole
document (``apiVersion``, ``kind``, ``metadata``, ``spec``) and our ``revision``."""

from __future__ import annotations

from aiohttp import web

from mlynar_events import registry as commands
from mlynar_events.errors import NotFound
from mlynar_events.names import is_dns1123_label
from mlynar_events.specs import parse_document
from projections import queries

from .context import ctx
from .errors import json_body
from .models import Declared, DataKindOut, OperatorOut
from .principal import actor

ACTOR = "api"


async def list_data_kinds(request: web.Request) -> web.Response:
    rows = await queries.data_kinds(ctx(request).db)
    return web.json_response([
        DataKindOut(name=r["name"], displayName=r["spec"].get("displayName"), metadata={"name": r["name"]},
                    spec=r["spec"]).model_dump(mode="json") for r in rows
    ])


async def list_operators(request: web.Request) -> web.Response:
    rows = await queries.operators(ctx(request).db)
    return web.json_response([
        OperatorOut(**{k: v for k, v in r["spec"].items() if k not in OperatorOut.model_fields}, name=r["name"],
                    metadata={"name": r["name"]}, spec=r["spec"], revision=r["revision"]).model_dump(mode="json")
        for r in rows
    ])


async def _declare(request: web.Request, kind: str) -> web.Response:
    c = ctx(request)
    doc = parse_document(await json_body(request), expect=kind)
    seq, registry = await commands.declare(c.store, doc, actor=actor(request))
    await c.caught_up(seq)
    name = doc.metadata.name
    revision = registry.operators[name][1] if kind == "Operator" else None
    return web.json_response(
        Declared(name=name, changed=seq is not None, revision=revision).model_dump(mode="json"),
        status=201 if seq is not None else 200,
    )


async def declare_data_kind(request: web.Request) -> web.Response:
    return await _declare(request, "DataKind")


async def declare_operator(request: web.Request) -> web.Response:
    return await _declare(request, "Operator")


def _name(request: web.Request, what: str) -> str:
    name = request.match_info["name"]
    if not is_dns1123_label(name):
        raise NotFound(f"{what} {name!r} does not exist")
    return name


async def delete_data_kind(request: web.Request) -> web.Response:
    c = ctx(request)
    seq = await commands.delete_kind(c.store, _name(request, "data kind"), actor=actor(request))
    await c.caught_up(seq)
    return web.json_response({"deleted": True})


async def delete_operator(request: web.Request) -> web.Response:
    c = ctx(request)
    seq = await commands.delete_operator(c.store, _name(request, "operator"), actor=actor(request))
    await c.caught_up(seq)
    return web.json_response({"deleted": True})
