"""The ``tokens`` view: every API token's principal, role and SHA-256 (never the token), and when
it was revoked; and its queries. The auth middleware looks a bearer token up here by digest, so
a revocation holds on an API replica as soon as its views include the ``TokenRevoked``."""

from __future__ import annotations

from typing import Any

import aiosqlite

from mlynar_events.events import TokenCreated, TokenRevoked

from .batch import Batch, handles


@handles(TokenCreated)
def _created(b: Batch, e: TokenCreated, seq: int, at: str) -> None:
    b.execute(
        "INSERT OR IGNORE INTO tokens (id, principal, role, digest, description, created_by, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (e.token_id, e.principal, e.role, e.digest, e.description, b.actor, at),
    )


@handles(TokenRevoked)
def _revoked(b: Batch, e: TokenRevoked, seq: int, at: str) -> None:
    b.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (at, e.token_id))


def token_row(r: aiosqlite.Row) -> dict[str, Any]:
    return {"id": r["id"], "principal": r["principal"], "role": r["role"], "description": r["description"],
            "createdBy": r["created_by"], "createdAt": r["created_at"], "revokedAt": r["revoked_at"]}


async def active_by_digest(db: aiosqlite.Connection, digest: str) -> tuple[str, str] | None:
    """``(principal, role)`` of the unrevoked token with this SHA-256, or ``None``."""
    rows = await db.execute_fetchall(
        "SELECT principal, role FROM tokens WHERE digest = ? AND revoked_at IS NULL", (digest,))
    return (rows[0][0], rows[0][1]) if rows else None


async def list_tokens(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    return [token_row(r) for r in await db.execute_fetchall("SELECT * FROM tokens ORDER BY created_at, id")]


async def get_token(db: aiosqlite.Connection, token_id: str) -> dict[str, Any] | None:
    rows = await db.execute_fetchall("SELECT * FROM tokens WHERE id = ?", (token_id,))
    return token_row(rows[0]) if rows else None
