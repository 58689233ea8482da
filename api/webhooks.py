"""Webhook routes: subscribe a URL to events, rotate its signing secret, re-enable it, read its
last delivery attempts.

Every change is an event (``WebhookCreated`` ...); the signing secret goes to the secret store
before the event that references it, and is answered exactly twice: by the creation and by a
rotation. Deliveries are the dispatcher's (``integrations/webhooks.py``); this module never
calls it, it reads the records the dispatcher keeps in NATS (``mlynar-webhook-deliveries``).
A subscription is checked here, before anything is written, by the same rules the dispatcher
applies (``mlynar_events/webhooks.py``): its types/runs must match something, its URL must be
a target this service may send to (SSRF).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from mlynar_events.errors import Conflict, NotFound
from mlynar_events.events import (
    WebhookCreated, WebhookDeleted, WebhookEnabled, WebhookSecretRotated,
)
from mlynar_events.principals import Role
from mlynar_events.store import ConcurrencyConflict
from mlynar_events.webhooks import (
    MAX_RUNS, WebhookRuleError, check_target, deliveries_bucket, delivery_filters,
    new_secret, new_secret_key, new_webhook_id, private_targets_allowed, read_deliveries,
)
from projections.webhook_views import get_webhook as view_of, webhooks as all_views

from .context import ctx
from .errors import BadRequest, json_body
from .models import Model
from .principal import actor, principal, visible_run

_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_GRACE = 7 * 86400.0


class WebhookIn(BaseModel):
    """``POST /api/webhooks``: the target and what it receives (empty lists: everything)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048)
    types: list[str] = Field(default_factory=list, max_length=100, description="event types (e.g. StepSucceeded)")
    runs: list[str] = Field(default_factory=list, max_length=MAX_RUNS, description="run ids: only their events")
    description: str = Field("", max_length=1000)


class RotateIn(BaseModel):
    """``POST /api/webhooks/{id}/rotate-secret`` (optional body): how long the old secret still
    signs; 0 revokes it at once (a leaked secret)."""

    model_config = ConfigDict(extra="forbid")
    gracePeriodSeconds: float | None = Field(None, ge=0, le=MAX_GRACE)


class WebhookOut(Model):
    id: str
    url: str
    types: list[str]
    runs: list[str]
    description: str
    owner: str | None = Field(None, description="who created it; a member's webhook gets only what the member may see")
    status: Literal["active", "failing"]
    failingSince: str | None = None
    lastError: str | None = None
    secretRotatedAt: str | None = None
    previousSecretValidUntil: str | None = None
    createdAt: str
    updatedAt: str


class WebhookWithSecret(WebhookOut):
    """The creation's answer: the only time the secret is shown, with the rotation's."""

    secret: str


class RotatedSecret(Model):
    id: str
    secret: str
    previousSecretValidUntil: str


def _out(row: dict) -> WebhookOut:
    return WebhookOut(
        id=row["id"], url=row["url"], types=row["types"], runs=row["runs"], description=row["description"],
        owner=row["owner"], status=row["status"], failingSince=row["failing_since"],
        lastError=row["last_error"] if row["status"] == "failing" else None,
        secretRotatedAt=row["secret_rotated_at"], previousSecretValidUntil=row["grace_until"],
        createdAt=row["created_at"], updatedAt=row["updated_at"])


async def _webhook(request: web.Request) -> dict:
    webhook_id = request.match_info["webhook_id"]
    found = await view_of(ctx(request).db, webhook_id) if _ID.match(webhook_id) else None
    if found is None or not principal(request).owns(found["owner"]):  # a member's own only
        raise NotFound(f"webhook {webhook_id!r} does not exist")
    return found


async def list_webhooks(request: web.Request) -> web.Response:
    who = principal(request)
    rows = [r for r in await all_views(ctx(request).db) if who.owns(r["owner"])]
    return web.json_response([_out(r).model_dump(mode="json") for r in rows])


async def get_webhook(request: web.Request) -> web.Response:
    return web.json_response(_out(await _webhook(request)).model_dump(mode="json"))


async def create_webhook(request: web.Request) -> web.Response:
    c = ctx(request)
    body = WebhookIn.model_validate(await json_body(request))
    try:
        delivery_filters(body.types, body.runs)
        await check_target(body.url, private_targets_allowed(c.settings))
    except WebhookRuleError as exc:
        raise BadRequest(str(exc), {"url": body.url, "types": body.types, "runs": body.runs}) from None
    who = principal(request)
    for run_id in body.runs:  # a member subscribes to its own runs only (others' do not exist for it)
        await visible_run(request, run_id)
    webhook_id = new_webhook_id()
    secret = new_secret()
    ref = await c.secrets.put(new_secret_key(webhook_id), secret)
    event = WebhookCreated(webhook_id=webhook_id, url=body.url, types=sorted(set(body.types)),
                           runs=sorted(set(body.runs)), description=body.description, secret_ref=ref,
                           owner=who.name, owner_role="member" if who.role is Role.MEMBER else "admin")
    try:
        ack = await c.store.append(event, actor=actor(request), expected_seq=0)
    except BaseException:  # nothing references it: leave nothing behind
        await c.secrets.delete(ref)
        raise
    await c.caught_up(ack.seq)
    out = _out(await _webhook_row(request, webhook_id))
    return web.json_response(WebhookWithSecret(**out.model_dump(), secret=secret).model_dump(mode="json"),
                             status=201)


async def _webhook_row(request: web.Request, webhook_id: str) -> dict:
    found = await view_of(ctx(request).db, webhook_id)
    if found is None:  # deleted between our append and this read
        raise NotFound(f"webhook {webhook_id!r} does not exist")
    return found


async def delete_webhook(request: web.Request) -> web.Response:
    c = ctx(request)
    row = await _webhook(request)
    ack = await c.store.append(WebhookDeleted(webhook_id=row["id"]), actor=actor(request))
    for ref in (row["secret_ref"], row["previous_secret_ref"]):
        if ref:
            await c.secrets.delete(ref)
    await c.caught_up(ack.seq)
    return web.json_response({"deleted": True})


async def rotate_secret(request: web.Request) -> web.Response:
    """A new secret signs from now on; the current one too until the grace period ends. A
    secret older than the current one stops signing now (at most two ever sign)."""
    c = ctx(request)
    row = await _webhook(request)
    raw = await json_body(request, required=False)
    grace = RotateIn.model_validate(raw or {}).gracePeriodSeconds
    grace = c.settings.webhook_rotation_grace if grace is None else grace
    secret = new_secret()
    ref = await c.secrets.put(new_secret_key(row["id"]), secret)
    until = datetime.now(timezone.utc) + timedelta(seconds=grace)
    try:
        ack = await c.store.append(
            WebhookSecretRotated(webhook_id=row["id"], secret_ref=ref, previous_ref=row["secret_ref"],
                                 grace_until=until),
            actor=actor(request), expected_seq=row["version"])
    except ConcurrencyConflict:
        await c.secrets.delete(ref)
        raise Conflict("the webhook changed meanwhile (another rotation, or it was marked failing); try again") from None
    except BaseException:
        await c.secrets.delete(ref)
        raise
    if row["previous_secret_ref"]:
        await c.secrets.delete(row["previous_secret_ref"])
    await c.caught_up(ack.seq)
    return web.json_response(RotatedSecret(id=row["id"], secret=secret,
                                           previousSecretValidUntil=until.isoformat()).model_dump(mode="json"),
                             status=201)


async def enable_webhook(request: web.Request) -> web.Response:
    """A failing webhook delivers again, starting with the event it failed on; an active one
    is left as it is."""
    c = ctx(request)
    row = await _webhook(request)
    if row["status"] == "failing":
        ack = await c.store.append(WebhookEnabled(webhook_id=row["id"]), actor=actor(request))
        await c.caught_up(ack.seq)
        row = await _webhook_row(request, row["id"])
    return web.json_response(_out(row).model_dump(mode="json"))


async def list_deliveries(request: web.Request) -> web.Response:
    """The last delivery attempts, newest first, as the dispatcher recorded them."""
    c = ctx(request)
    row = await _webhook(request)
    attempts = await read_deliveries(await deliveries_bucket(c.store.js, create=False), row["id"])
    return web.json_response([a.model_dump(mode="json") for a in reversed(attempts)])

