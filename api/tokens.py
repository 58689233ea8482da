"""Token routes (admin only): create an API token for a principal with a role (the token is
answered once and only its SHA-256 is kept), list them, revoke one.

Every change is an event (``TokenCreated``, ``TokenRevoked``), so the history says who gave
whom which access and when. A revocation answers only once this API's views include it, so the
token is refused here from the moment the answer is sent (other API replicas: as soon as their
views reach that event, normally milliseconds)."""

from __future__ import annotations

import re
from typing import Literal

from aiohttp import web
from pydantic import ConfigDict, Field

from mlynar_events.errors import NotFound
from mlynar_events.events import TokenCreated, TokenRevoked
from mlynar_events.names import DNS1123_LABEL
from mlynar_events.principals import ANONYMOUS, BOOTSTRAP_ADMIN, check_principal_name, new_token, new_token_id, token_digest
from projections import token_views

from .context import ctx
from .errors import BadRequest, json_body
from .models import Model
from .principal import actor, token_revoked

_ID = re.compile(r"tok-[0-9a-f]{12}")
SERVICE_ACTORS = frozenset({"serve", "solver", "executor", "projector", "api", "system", "registry-file", "crd-sync"})
"""Names the service itself acts as: a principal named so would be indistinguishable from it in
every history, and would own what it owns (the built-in machine ``local`` is ``serve``'s)."""
RESERVED_NAMES = sorted({BOOTSTRAP_ADMIN.name, ANONYMOUS.name} | SERVICE_ACTORS)
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _principal_refusal(name: str) -> str | None:
    """Why a token cannot be for ``name``: :func:`check_principal_name`, the whole name a label
    (no trailing newline, which the rule's ``$`` lets through), and not a name of the service's."""
    reason = check_principal_name(name)
    if reason is None and not _NAME.fullmatch(name):
        reason = f"principal {name!r} is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)"
    if reason is None and name in SERVICE_ACTORS:
        reason = f"principal name {name!r} is reserved: the service acts as {name!r}"
    return reason


class TokenIn(Model):
    """``POST /api/tokens``."""

    model_config = ConfigDict(extra="forbid")
    principal: str = Field(max_length=63, description="who the token is for (a DNS-1123 label)",
                           json_schema_extra={"pattern": DNS1123_LABEL.pattern, "not": {"enum": RESERVED_NAMES}})
    role: Literal["admin", "member", "viewer"]
    description: str = Field("", max_length=1000)


class TokenOut(Model):
    id: str
    principal: str
    role: str
    description: str
    createdBy: str
    createdAt: str
    revokedAt: str | None = None


class TokenWithSecret(TokenOut):
    token: str = Field(description="the bearer token: shown this once, only its SHA-256 is kept")


async def _token(request: web.Request) -> dict:
    token_id = request.match_info["token_id"]
    found = await token_views.get_token(ctx(request).db, token_id) if _ID.fullmatch(token_id) else None
    if found is None:
        raise NotFound(f"token {token_id!r} does not exist")
    return found


async def list_tokens(request: web.Request) -> web.Response:
    rows = await token_views.list_tokens(ctx(request).db)
    return web.json_response([TokenOut(**r).model_dump(mode="json") for r in rows])


async def create_token(request: web.Request) -> web.Response:
    c = ctx(request)
    body = TokenIn.model_validate(await json_body(request))
    reason = _principal_refusal(body.principal)
    if reason is not None:
        raise BadRequest(reason, {"principal": body.principal})
    token, token_id = new_token(), new_token_id()
    event = TokenCreated(token_id=token_id, principal=body.principal, role=body.role,
                         digest=token_digest(token), description=body.description)
    ack = await c.store.append(event, actor=actor(request), expected_seq=0)
    await c.caught_up(ack.seq)
    row = await token_views.get_token(c.db, token_id)
    assert row is not None
    return web.json_response(TokenWithSecret(**row, token=token).model_dump(mode="json"), status=201)


async def revoke_token(request: web.Request) -> web.Response:
    c = ctx(request)
    row = await _token(request)
    if row["revokedAt"] is None:
        ack = await c.store.append(TokenRevoked(token_id=row["id"]), actor=actor(request))
        await c.caught_up(ack.seq)
        token_revoked()  # this process's open event streams of the token end at their next event
        row = await _token(request)
    return web.json_response(TokenOut(**row).model_dump(mode="json"))
