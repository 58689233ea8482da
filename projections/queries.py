"""Read queries over the views, returning plain rows/dicts; the API shapes them for the wire."""

from __future__ import annotations

import json
from typing import Any

import aiosqlite


async def _all(db: aiosqlite.Connection, sql: str, args: tuple = ()) -> list[aiosqlite.Row]:
    async with db.execute(sql, args) as cur:
        return list(await cur.fetchall())


async def _one(db: aiosqlite.Connection, sql: str, args: tuple = ()) -> aiosqlite.Row | None:
    async with db.execute(sql, args) as cur:
        return await cur.fetchone()


async def get_run(db: aiosqlite.Connection, run_id: str) -> dict[str, Any] | None:
    run = await _one(db, "SELECT * FROM runs WHERE id = ?", (run_id,))
    if run is None:
        return None
    units = await _all(db, "SELECT * FROM data_units WHERE run_id = ? ORDER BY seq", (run_id,))
    steps = await _all(db, "SELECT * FROM steps WHERE run_id = ? ORDER BY seq", (run_id,))
    return {
        "run": dict(run),
        "units": [unit_row(u) for u in units],
        "steps": [step_row(s) for s in steps],
    }


def unit_row(u: aiosqlite.Row) -> dict[str, Any]:
    d = dict(u)
    d["ancestors"] = json.loads(d["ancestors"])
    return d


def step_row(s: aiosqlite.Row) -> dict[str, Any]:
    d = dict(s)
    d["inputs"] = json.loads(d["inputs"])
    d["outputs"] = json.loads(d["outputs"])
    return d


async def list_runs(db: aiosqlite.Connection, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    rows = await _all(db, "SELECT * FROM runs ORDER BY created_at DESC, id LIMIT ? OFFSET ?", (limit, offset))
    return [dict(r) for r in rows]


async def get_unit(db: aiosqlite.Connection, run_id: str, unit_id: str) -> dict[str, Any] | None:
    row = await _one(db, "SELECT * FROM data_units WHERE run_id = ? AND id = ?", (run_id, unit_id))
    return unit_row(row) if row else None


async def get_step(db: aiosqlite.Connection, run_id: str, step_id: str) -> dict[str, Any] | None:
    row = await _one(db, "SELECT * FROM steps WHERE run_id = ? AND id = ?", (run_id, step_id))
    if row is None:
        return None
    step = step_row(row)
    attempts = await _all(db, "SELECT * FROM step_attempts WHERE step_id = ? ORDER BY attempt", (step_id,))
    step["attempts"] = [dict(a) for a in attempts]
    return step


async def data_kinds(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    rows = await _all(db, "SELECT name, spec FROM data_kinds ORDER BY name")
    return [{"name": r["name"], "spec": json.loads(r["spec"])} for r in rows]


async def operators(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    rows = await _all(db, "SELECT name, spec, revision FROM operators ORDER BY name")
    return [{"name": r["name"], "spec": json.loads(r["spec"]), "revision": r["revision"]} for r in rows]


async def machines(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    rows = await _all(db, "SELECT * FROM machines ORDER BY name")
    return [machine_row(r) for r in rows]


async def get_machine(db: aiosqlite.Connection, name: str) -> dict[str, Any] | None:
    row = await _one(db, "SELECT * FROM machines WHERE name = ?", (name,))
    return machine_row(row) if row else None


def machine_row(r: aiosqlite.Row) -> dict[str, Any]:
    return {
        "name": r["name"], "url": r["url"], "labels": json.loads(r["labels"]),
        "hasToken": bool(r["has_token"]), "registeredAt": r["registered_at"], "updatedAt": r["updated_at"],
    }


async def dump(db: aiosqlite.Connection, tables: tuple[str, ...]) -> dict[str, list[tuple]]:
    """Every row of every view, sorted: what 'a rebuilt projection equals the live one' compares."""
    out = {}
    for table in tables:
        rows = await _all(db, f"SELECT * FROM {table}")
        out[table] = sorted(tuple(r) for r in rows)
    return out
