"""Machine routes. The token goes to the secret store; events and answers only carry
``hasToken``. ``check`` calls the agent's health endpoint with the stored token and answers only
the status, the latency and a fixed message, never the remote body. A stored token is only ever
sent to the URL it was given for: changing the URL needs the token again (or ``"token": null``
to drop it).

A machine belongs to the principal that registered it; a member may change, delete and check
only its own, an admin any; only an admin shares one (``sharedWith``, :func:`_may_share`). Whose runs may use it is the executor's check
(:func:`mlynar_events.principals.may_use_machine`)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from mlynar_events.errors import Conflict, Forbidden, NotFound
from mlynar_events.events import MachineDeleted, MachineRegistered, MachineUpdated, key_filter
from mlynar_events.names import is_dns1123_label
from mlynar_events.secrets import machine_token_key, secret_ref
from mlynar_events.store import ConcurrencyConflict
from projections import queries

from .context import ctx
from .errors import BadRequest, json_body
from .models import MachineCheck, MachineIn, MachineOut, MachineUpdate
from .principal import actor, principal


async def _machine(request: web.Request) -> dict:
    name = request.match_info["name"]
    found = await queries.get_machine(ctx(request).db, name) if is_dns1123_label(name) else None
    if found is None:
        raise NotFound(f"machine {name!r} does not exist")
    return found


async def _own_machine(request: web.Request) -> dict:
    """The route's machine, if the caller may change it (its owner, or an admin): else 403."""
    found = await _machine(request)
    who = principal(request)
    if not who.owns(found["owner"]):
        raise Forbidden(f"machine {found['name']!r} belongs to {found['owner']!r}; only its owner or an admin "
                        "may change, check or delete it", {"owner": found["owner"], "principal": who.name})
    return found


def _whole_names(*names: str) -> None:
    """400 for a name the label rule's ``$`` let through with a trailing newline (``"gpu\\n"``):
    no NATS subject or secret key can hold it, and it would only pass for another name."""
    bad = [n for n in names if n.endswith("\n")]
    if bad:
        raise BadRequest(f"{bad[0]!r} is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)")


def _may_share(request: web.Request, shared_with: list[str]) -> None:
    """Only an admin shares a machine. Sharing sends *other* principals' step inputs to the
    machine, so the machine's owner cannot be the one to decide it: a member that registered
    ``gpu-box`` (a name an operator uses) shared with everyone would receive every run's data for
    that operator. A member's machine runs only that member's runs unless an admin shares it."""
    if shared_with and not principal(request).is_admin:
        raise Forbidden("only an admin may share a machine with other principals (their runs' data would go to it)",
                        {"sharedWith": shared_with})


async def list_machines(request: web.Request) -> web.Response:
    return web.json_response(await queries.machines(ctx(request).db))


async def get_machine(request: web.Request) -> web.Response:
    return web.json_response(MachineOut(**await _machine(request)).model_dump(mode="json"))


async def register_machine(request: web.Request) -> web.Response:
    c = ctx(request)
    body = MachineIn.model_validate(await json_body(request))
    _whole_names(body.name, *body.sharedWith)
    if await queries.get_machine(c.db, body.name) is not None:
        raise Conflict(f"machine {body.name!r} already exists; PUT /api/machines/{body.name} updates it")
    if await c.store.read(key_filter("machine", body.name)):
        # registered before: deleted since (a name is never reused, so whoever registers it next
        # cannot take over the operators that name it), or registered a moment ago and not in
        # these views yet. Refused before its token is written, which would replace the
        # machine's own (its secret key is its name's).
        raise Conflict(f"machine {body.name!r} exists or existed; a machine's name is not reused")
    _may_share(request, body.sharedWith)
    token_ref = await c.secrets.put(machine_token_key(body.name), body.token) if body.token else None
    try:
        ack = await c.store.append(
            MachineRegistered(name=body.name, url=body.url, labels=body.labels, token_ref=token_ref,
                              owner=actor(request), shared_with=sorted(set(body.sharedWith))),
            actor=actor(request), expected_seq=0,
        )
    except ConcurrencyConflict:
        raise Conflict(f"machine {body.name!r} already exists") from None
    except BaseException:
        if token_ref is not None:  # no machine points at it: leave no orphan secret behind
            await c.secrets.delete(machine_token_key(body.name))
        raise
    await c.caught_up(ack.seq)
    return web.json_response((await queries.get_machine(c.db, body.name)), status=201)


async def update_machine(request: web.Request) -> web.Response:
    c = ctx(request)
    current = await _own_machine(request)
    body = MachineUpdate.model_validate(await json_body(request))
    _whole_names(*(body.sharedWith or []))
    if body.sharedWith is not None and body.sharedWith != current["sharedWith"]:
        _may_share(request, body.sharedWith)
    name = current["name"]
    url = body.url or current["url"]
    token_given = "token" in body.model_fields_set
    if url != current["url"] and current["hasToken"] and not token_given:
        raise BadRequest(f"changing the URL of machine {name!r} needs its token again (or \"token\": null "
                         "to drop it): the stored token is never sent to another host",
                         {"url": current["url"], "newUrl": url})
    token_ref = secret_ref(machine_token_key(name)) if current["hasToken"] else None
    if token_given:
        token_ref = await c.secrets.put(machine_token_key(name), body.token) if body.token else None
    ack = await c.store.append(
        MachineUpdated(name=name, url=url,
                       labels=body.labels if body.labels is not None else current["labels"], token_ref=token_ref,
                       owner=current["owner"],
                       shared_with=sorted(set(body.sharedWith)) if body.sharedWith is not None else current["sharedWith"]),
        actor=actor(request),
    )
    if token_given and body.token is None:
        await c.secrets.delete(machine_token_key(name))
    await c.caught_up(ack.seq)
    return web.json_response(await queries.get_machine(c.db, name))


async def delete_machine(request: web.Request) -> web.Response:
    c = ctx(request)
    name = (await _own_machine(request))["name"]
    ack = await c.store.append(MachineDeleted(name=name), actor=actor(request))
    await c.secrets.delete(machine_token_key(name))
    await c.caught_up(ack.seq)
    return web.json_response({"deleted": True})


CHECK_MESSAGES = {200: "the agent is healthy", 401: "the agent refused the token (none stored?)",
                  403: "the agent refused the token"}


async def check_machine(request: web.Request) -> web.Response:
    c = ctx(request)
    machine = await _own_machine(request)
    name, url = machine["name"], machine["url"]
    token = await c.secrets.get(machine_token_key(name))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            # no redirects: the token goes to the registered URL and nowhere else
            async with session.get(f"{url}/v1/healthz", headers=headers, allow_redirects=False) as resp:
                status = resp.status
        latency = round((loop.time() - started) * 1000, 1)
        detail = CHECK_MESSAGES.get(status, f"{url} answered HTTP {status}, not a healthy machine agent")
        result = MachineCheck(name=name, ok=status == 200, status=status, latencyMs=latency, detail=detail)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"failed ({type(exc).__name__})"
        result = MachineCheck(name=name, ok=False, detail=f"connecting to {url} {reason}")
    return web.json_response(result.model_dump(mode="json"))
