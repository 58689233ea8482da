"""The caller of a request, as the handlers see it: who (:func:`principal`), what its events
carry as ``actor`` (:func:`actor`), and which runs it may see (:func:`visible_run`,
:func:`owner_filter`). Set by ``api/auth.py``; the rules themselves are
:mod:`mlynar_events.principals`."""

from __future__ import annotations

import asyncio
import uuid
from typing import Awaitable, Callable

from aiohttp import web

from mlynar_events.errors import NotFound
from mlynar_events.events import RunCreated, RunEvent, StoredEvent
from mlynar_events.principals import Principal, Role, may_see
from projections import queries, token_views

from .context import ctx

PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
TOKEN_DIGEST: web.RequestKey[str] = web.RequestKey("token-digest", str)
"""The SHA-256 of the request's bearer token when it can be revoked (one of ``POST /api/tokens``):
what an open event stream checks again (:func:`event_visibility`). Not set for the bootstrap
token or an anonymous caller."""
TOKEN_RECHECK = 1.0
"""Seconds an open event stream trusts its token before looking it up again (a revocation
answered by *this* process is noticed before the stream's next event; one answered by another
API replica within this)."""
_revocations = [0]
"""How many revocations this process has answered (:func:`token_revoked`)."""


class AccessRevoked(Exception):
    """The token of an open event stream was revoked: the stream ends (``api/events.py``)."""


def token_revoked() -> None:
    """``DELETE /api/tokens/{id}``, once this process's views include the revocation: every open
    event stream of this process looks its token up again before it sends another event."""
    _revocations[0] += 1


def principal(request: web.Request) -> Principal:
    """The caller of an ``Access.API`` route (set by the auth middleware)."""
    return request[PRINCIPAL]


def actor(request: web.Request) -> str:
    """The ``actor`` of every event this request causes: its principal's name."""
    found = request.get(PRINCIPAL)
    return found.name if found is not None else f"api:{request.remote or 'unknown'}"


async def _run_owner(request: web.Request, run_id: str) -> tuple[bool, str | None]:
    """Whether run ``run_id`` exists or existed, and its owner: from the views, or for a run they
    do not show from the stream's fold of it: one created on another API replica a moment ago,
    or a deleted one (the views forget it, but its events, its history, stay in the stream and
    remain its owner's)."""
    c = ctx(request)
    exists, owner = await queries.run_owner(c.db, run_id)
    if not exists:
        state = await c.runs.get(run_id)
        exists, owner = state.version > 0, state.owner
    return exists, owner


def token_check(request: web.Request) -> Callable[[], Awaitable[None]] | None:
    """For a stream of a revocable token: raises :class:`AccessRevoked` once the token is
    revoked (looked up again after :data:`TOKEN_RECHECK` or any revocation of this process).
    Called before each event (through :func:`event_visibility`) and before each keep-alive of
    an idle stream, which would otherwise stay open, empty, for a revoked client."""
    digest = request.get(TOKEN_DIGEST)
    if digest is None:
        return None
    c = ctx(request)
    loop = asyncio.get_running_loop()
    checked = [-TOKEN_RECHECK, -1]  # looked up at the first event (it may be revoked since the request came)

    async def check() -> None:
        now = loop.time()
        if now - checked[0] < TOKEN_RECHECK and checked[1] == _revocations[0]:
            return
        checked[:] = [now, _revocations[0]]  # before the lookup: a revocation during it checks again
        if await token_views.active_by_digest(c.db, digest) is None:
            raise AccessRevoked(f"the token of {principal(request).name!r} was revoked")

    return check


def event_visibility(request: web.Request) -> Callable[[StoredEvent], Awaitable[bool]] | None:
    """What the caller may see of the event stream: ``None`` for the bootstrap admin or an
    anonymous caller (everything); a viewer sees all but tokens and webhooks; a member also sees
    only its own runs' events. A stream of a token created with ``POST /api/tokens`` (an admin's
    too) raises :class:`AccessRevoked` at its first event after the token's revocation."""
    who = principal(request)
    token_valid = token_check(request)
    if who.is_admin and token_valid is None:
        return None
    owners: dict[str, bool] = {}  # run id -> the member may see it (learnt once per stream)

    async def visible(stored: StoredEvent) -> bool:
        if token_valid is not None:
            await token_valid()
        event = stored.event
        if who.role is not Role.MEMBER or not isinstance(event, RunEvent):
            return may_see(who, event.aggregate)
        # a member's run events: whether it owns the run, learnt once per stream (the rule is may_see's)
        if isinstance(event, RunCreated):
            owners[event.run_id] = may_see(who, "run", event.owner)
        if event.run_id not in owners:
            exists, owner = await _run_owner(request, event.run_id)
            owners[event.run_id] = exists and may_see(who, "run", owner)
        return owners[event.run_id]

    return visible


async def visible_run(request: web.Request, run_id: str) -> None:
    """404 unless the caller may see run ``run_id``: a member sees only its own runs, also once
    they are deleted (a run it may not see does not exist for it, so its existence is not
    revealed either); an admin or a viewer sees every run."""
    who = principal(request)
    if who.role is not Role.MEMBER:
        return
    exists, owner = await _run_owner(request, run_id)
    if exists and not who.owns(owner):
        raise NotFound(f"run {run_id!r} does not exist")


async def route_run(request: web.Request) -> str:
    """The route's ``{run_id}``, normalised, once the caller may see it; 404 for an id that is
    not a UUID (no run has it) or a run the caller may not see."""
    text = request.match_info["run_id"]
    try:
        run_id = str(uuid.UUID(text))
    except ValueError:
        raise NotFound(f"run {text!r} does not exist") from None
    await visible_run(request, run_id)
    return run_id


def owner_filter(request: web.Request) -> str | None:
    """The owner a listing is limited to: a member's own name; nobody's for the other roles."""
    who = principal(request)
    return who.name if who.role is Role.MEMBER else None
