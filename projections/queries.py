"""Read queries over the views, returning plain rows/dicts; the API shapes them for the wire,
except for the hottest read, ``GET /api/run/{id}``, whose JSON body :func:`run_body` has SQLite
build.

A run's reads go through :func:`projections.connection.reader`, synchronously on the event loop
thread (a few indexed SELECTs cost less than one hop to aiosqlite's thread); the others take one
hop each (``execute_fetchall``) rather than the three of execute + fetch + close."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import aiosqlite

from mlynar_events.names import JOB_PREFIX, PVC_SUFFIX

from .connection import reader


async def _all(db: aiosqlite.Connection, sql: str, args: tuple = ()) -> list[aiosqlite.Row]:
    return list(await db.execute_fetchall(sql, args))


async def _one(db: aiosqlite.Connection, sql: str, args: tuple = ()) -> aiosqlite.Row | None:
    rows = await _all(db, sql, args)
    return rows[0] if rows else None


RunRows = tuple[sqlite3.Row, list[sqlite3.Row], list[sqlite3.Row]]


def run_rows(conn: sqlite3.Connection, run_id: str) -> RunRows | None:
    """The run's row, its units and its steps (in stream order); None if there is no such run."""
    found = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchall()
    if not found:
        return None
    run = found[0]
    units = conn.execute("SELECT * FROM data_units WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
    steps = conn.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
    return run, units, steps


async def get_run(db: aiosqlite.Connection, run_id: str) -> dict[str, Any] | None:
    found = run_rows(await reader(db), run_id)
    if found is None:
        return None
    run, units, steps = found
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


async def list_runs(db: aiosqlite.Connection, limit: int = 100, offset: int = 0,
                    owner: str | None = None) -> list[dict[str, Any]]:
    """Newest first; only ``owner``'s runs when given (what a member sees)."""
    where, args = ("WHERE owner = ? ", (owner,)) if owner is not None else ("", ())
    rows = await _all(db, f"SELECT * FROM runs {where}ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                      (*args, limit, offset))
    return [dict(r) for r in rows]


async def run_owner(db: aiosqlite.Connection, run_id: str) -> tuple[bool, str | None]:
    """Whether the run is in the views, and its owner."""
    row = await _one(db, "SELECT owner FROM runs WHERE id = ?", (run_id,))
    return (row is not None, row["owner"] if row else None)


async def get_unit(db: aiosqlite.Connection, run_id: str | None, unit_id: str) -> dict[str, Any] | None:
    """A unit of a run, or (``run_id`` None) by its id alone: unit ids are UUIDs, unique overall."""
    if run_id is None:
        row = await _one(db, "SELECT * FROM data_units WHERE id = ?", (unit_id,))
    else:
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
        "owner": r["owner"], "sharedWith": json.loads(r["shared_with"]),
    }


async def dump(db: aiosqlite.Connection, tables: tuple[str, ...]) -> dict[str, list[tuple]]:
    """Every row of every view, sorted: what 'a rebuilt projection equals the live one' compares."""
    out = {}
    for table in tables:
        rows = await _all(db, f"SELECT * FROM {table}")
        out[table] = sorted(tuple(r) for r in rows)
    return out


# ---- GET /api/run/{id}: the body, as JSON text built by SQLite ---------------------------------


RUN_BODY_SQL = f"""
SELECT json_object(
    'id', r.id,
    '_id', r.id,
    '_rev', r.version || '-mlynar',
    'status', r.status,
    'steps', (SELECT json_group_array(json_object(
            'id', s.id,
            'jobName', '{JOB_PREFIX}' || s.id,
            'pvcName', '{JOB_PREFIX}' || s.id || '{PVC_SUFFIX}',
            'operator', s.operator,
            'status', s.status,
            'inputDataUnits', json(s.inputs),
            'outputDataUnits', json(s.outputs),
            'revision', s.revision,
            'attempt', s.attempt,
            'target', s.target,
            'error', s.error,
            'logsUrl', :base || '/api/run/' || s.run_id || '/steps/' || s.id || '/logs',
            'scheduledAt', s.scheduled_at,
            'startedAt', s.started_at,
            'finishedAt', s.finished_at))
        FROM (SELECT * FROM steps WHERE run_id = r.id ORDER BY seq) AS s),
    'dataPool', (SELECT json_group_array(json_object(
            'id', u.id,
            'dataKind', u.data_kind,
            'ancestors', json(u.ancestors),
            'url', :base || '/static/' || u.run_id || '/data/' || u.id,
            'size', u.size,
            'sha256', u.sha256,
            'filename', u.filename,
            'stepId', u.step_id))
        FROM (SELECT * FROM data_units WHERE run_id = r.id ORDER BY seq) AS u),
    'paramPool', (SELECT json_group_object(op.key, (SELECT json_group_array(json_object(
                'name', param.key,
                'defaultValue', COALESCE((
                    SELECT json_extract(env.value, '$.defaultValue')
                    FROM operators AS o, json_each(o.spec, '$.configurableEnv') AS env
                    WHERE o.name = op.key AND json_extract(env.value, '$.name') = param.key
                    ORDER BY env.key DESC LIMIT 1), ''),
                'value', param.value))
            FROM json_each(op.value) AS param))
        FROM json_each(r.param_pool) AS op),
    'stepCounts', json_object(
        'total', r.steps_total,
        'succeeded', r.steps_succeeded,
        'failed', r.steps_failed,
        'cancelled', r.steps_cancelled,
        'active', r.steps_total - r.steps_succeeded - r.steps_failed - r.steps_cancelled),
    'owner', r.owner,
    'maxParallel', r.max_parallel,
    'terminationReason', r.termination_reason,
    'createdAt', r.created_at,
    'updatedAt', r.updated_at,
    'startTime', r.started_at,
    'endTime', CASE WHEN r.status IN ('complete', 'terminated') THEN r.updated_at END,
    'durationMs', CASE WHEN r.status IN ('complete', 'terminated') AND r.started_at IS NOT NULL
        THEN CAST(ROUND((julianday(r.updated_at) - julianday(r.started_at)) * 86400000) AS INTEGER) END,
    'version', r.version)
FROM runs AS r WHERE r.id = :id
"""
"""``GET /api/run/{id}``'s body: the shape of the API's ``RunOut`` (api/models.py, which documents
it in OpenAPI; tests/test_api.py checks it), built by SQLite in one statement. Building it in
Python instead (three queries, ``json.loads`` of the stored lists, dicts, ``json.dumps``) took
3-4 times as long, and this is the hottest read. Parameter defaults come from the operator's
current declaration (the last ``configurableEnv`` entry of that name, like a dict would keep);
SQLite keeps a FROM-subquery's ORDER BY for an order-sensitive aggregate like
``json_group_array``.

``_id``, ``_rev``, ``startTime``, ``endTime`` and ``durationMs`` are what clients of the original
Mlynar's current version (a CouchDB document) read: ``_id`` is ``id``, ``_rev`` is the run's
version (the stream sequence of its last event) with a suffix, ``startTime`` when the run was
started (``POST /run``), ``endTime`` the time of its last event once it is complete or
terminated (nothing follows those but a new upload, which makes it running again)."""


async def run_body(db: aiosqlite.Connection, run_id: str, base: str) -> str | None:
    """The run as ``GET /api/run/{id}`` answers it, as JSON text (URLs under ``base``); None if
    there is no such run."""
    rows = (await reader(db)).execute(RUN_BODY_SQL, {"id": run_id, "base": base}).fetchall()
    return rows[0][0] if rows else None
