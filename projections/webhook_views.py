"""The ``webhooks`` view: each webhook's subscription, status and secret references (never a
secret: those are in the secret store), gone once deleted; and its queries. ``version`` is the
sequence of the webhook's last event (what a rotation is conditional on).

``status`` is ``active`` or ``failing`` (the dispatcher gave up after its consecutive failures;
``POST /api/webhooks/{id}/enable`` makes it active again)."""

from __future__ import annotations

import json
from typing import Any

import aiosqlite

from mlynar_events.events import (
    WebhookCreated, WebhookDeleted, WebhookDisabled, WebhookEnabled, WebhookSecretRotated,
)

from .batch import Batch, handles


@handles(WebhookCreated)
def _created(b: Batch, e: WebhookCreated, seq: int, at: str) -> None:
    b.execute(
        "INSERT OR REPLACE INTO webhooks (id, url, types, runs, description, owner, status, secret_ref, created_seq,"
        " version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?)",
        (e.webhook_id, e.url, json.dumps(e.types), json.dumps(e.runs), e.description, e.owner, e.secret_ref, seq,
         seq, at, at),
    )


@handles(WebhookSecretRotated)
def _rotated(b: Batch, e: WebhookSecretRotated, seq: int, at: str) -> None:
    b.execute(
        "UPDATE webhooks SET secret_ref = ?, previous_secret_ref = ?, grace_until = ?, secret_rotated_at = ?,"
        " version = ?, updated_at = ? WHERE id = ?",
        (e.secret_ref, e.previous_ref, e.grace_until.isoformat(), at, seq, at, e.webhook_id),
    )


@handles(WebhookDisabled)
def _disabled(b: Batch, e: WebhookDisabled, seq: int, at: str) -> None:
    b.execute("UPDATE webhooks SET status = 'failing', failing_since = ?, last_error = ?, version = ?, updated_at = ?"
              " WHERE id = ?", (at, e.error, seq, at, e.webhook_id))


@handles(WebhookEnabled)
def _enabled(b: Batch, e: WebhookEnabled, seq: int, at: str) -> None:
    b.execute("UPDATE webhooks SET status = 'active', failing_since = NULL, version = ?, updated_at = ? WHERE id = ?",
              (seq, at, e.webhook_id))


@handles(WebhookDeleted)
def _deleted(b: Batch, e: WebhookDeleted, seq: int, at: str) -> None:
    b.execute("DELETE FROM webhooks WHERE id = ?", (e.webhook_id,))


def _row(r: aiosqlite.Row) -> dict[str, Any]:
    d = dict(r)
    d["types"] = json.loads(d["types"])
    d["runs"] = json.loads(d["runs"])
    return d


async def webhooks(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    """Every webhook, oldest first."""
    return [_row(r) for r in await db.execute_fetchall("SELECT * FROM webhooks ORDER BY created_seq")]


async def get_webhook(db: aiosqlite.Connection, webhook_id: str) -> dict[str, Any] | None:
    rows = list(await db.execute_fetchall("SELECT * FROM webhooks WHERE id = ?", (webhook_id,)))
    return _row(rows[0]) if rows else None
