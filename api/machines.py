"""Machine routes. The token goes to the secret store; events and answers only carry
``hasToken``. ``check`` calls the agent's health endpoint with the stored token."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from mlynar_events.errors import Conflict, NotFound
from mlynar_events.events import MachineDeleted, MachineRegistered, MachineUpdated
from mlynar_events.names import is_dns1123_label
from mlynar_events.secrets import machine_token_key, secret_ref
from mlynar_events.store import ConcurrencyConflict
from projections import queries

from .context import ctx
from .errors import json_body
from .models import MachineCheck, MachineIn, MachineOut, MachineUpdate


async def _machine(request: web.Request) -> dict:
    name = request.match_info["name"]
    found = await queries.get_machine(ctx(request).db, name) if is_dns1123_label(name) else None
    if found is None:
        raise NotFound(f"machine {name!r} does not exist")
    return found


async def list_machines(request: web.Request) -> web.Response:
    return web.json_response(await queries.machines(ctx(request).db))


async def get_machine(request: web.Request) -> web.Response:
    return web.json_response(MachineOut(**await _machine(request)).model_dump(mode="json"))


async def register_machine(request: web.Request) -> web.Response:
    c = ctx(request)
    body = MachineIn.model_validate(await json_body(request))
    if await queries.get_machine(c.db, body.name) is not None:
        raise Conflict(f"machine {body.name!r} already exists; PUT /api/machines/{body.name} updates it")
    token_ref = await c.secrets.put(machine_token_key(body.name), body.token) if body.token else None
    try:
        ack = await c.store.append(
            MachineRegistered(name=body.name, url=body.url, labels=body.labels, token_ref=token_ref),
            actor=f"api:{request.remote}", expected_seq=0,
        )
    except ConcurrencyConflict:
        raise Conflict(f"machine {body.name!r} already exists") from None
    await c.caught_up(ack.seq)
    return web.json_response((await queries.get_machine(c.db, body.name)), status=201)


async def update_machine(request: web.Request) -> web.Response:
    c = ctx(request)
    current = await _machine(request)
    body = MachineUpdate.model_validate(await json_body(request))
    name = current["name"]
    token_ref = secret_ref(machine_token_key(name)) if current["hasToken"] else None
    if body.token:
        token_ref = await c.secrets.put(machine_token_key(name), body.token)
    ack = await c.store.append(
        MachineUpdated(name=name, url=body.url or current["url"],
                       labels=body.labels if body.labels is not None else current["labels"], token_ref=token_ref),
        actor=f"api:{request.remote}",
    )
    await c.caught_up(ack.seq)
    return web.json_response(await queries.get_machine(c.db, name))


async def delete_machine(request: web.Request) -> web.Response:
    c = ctx(request)
    name = (await _machine(request))["name"]
    ack = await c.store.append(MachineDeleted(name=name), actor=f"api:{request.remote}")
    await c.secrets.delete(machine_token_key(name))
    await c.caught_up(ack.seq)
    return web.json_response({"deleted": True})


async def check_machine(request: web.Request) -> web.Response:
    c = ctx(request)
    machine = await _machine(request)
    token = await c.secrets.get(machine_token_key(machine["name"]))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{machine['url']}/v1/healthz", headers=headers) as resp:
                try:
                    detail = await resp.json(content_type=None)
                except ValueError:
                    detail = (await resp.text())[:500]
                result = MachineCheck(name=machine["name"], ok=resp.status == 200, status=resp.status, detail=detail)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        result = MachineCheck(name=machine["name"], ok=False, detail=f"{machine['url']}: {exc!r}")
    return web.json_response(result.model_dump(mode="json"))
