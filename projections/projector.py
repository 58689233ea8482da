"""The projector: applies the stream, in order, to the SQLite read views.

Each batch of events and the checkpoint are written in one transaction, so every event is applied
exactly once even across crashes. ``wait_for(seq)`` lets the API answer only after the views show
its own append (read-your-writes).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Awaitable, Callable

import aiosqlite

from mlynar_events.events import (
    DataKindDeclared, DataKindDeleted, DataUnitAdded, Event, MachineDeleted, MachineRegistered,
    MachineUpdated, OperatorDeclared, OperatorDeleted, RunCompleted, RunCreated, RunDeleted,
    RunStarted, RunTerminated, RunTerminationRequested, StepAttemptFailed, StepCancelled,
    StepFailed, StepScheduled, StepStarted, StepSucceeded, StoredEvent,
)
from mlynar_events.store import EventStore

from .schema import DDL, SCHEMA_VERSION

log = logging.getLogger("mlynar.projector")

BATCH = 500


async def open_db(path: Path) -> aiosqlite.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path)
    db.row_factory = aiosqlite.Row
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.execute("PRAGMA foreign_keys=OFF")
    version = None
    try:
        async with db.execute("SELECT value FROM meta WHERE key='schema'") as cur:
            row = await cur.fetchone()
            version = int(row[0]) if row else None
    except aiosqlite.OperationalError:
        pass
    if version is not None and version != SCHEMA_VERSION:
        log.warning("projection schema changed; rebuilding from the stream", extra={"old": version})
        async with db.execute("SELECT name FROM sqlite_master WHERE type='table'") as cur:
            tables = [r[0] for r in await cur.fetchall()]
        for table in tables:
            await db.execute(f'DROP TABLE "{table}"')
    await db.executescript(DDL)
    await db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    await db.execute("INSERT OR IGNORE INTO checkpoint VALUES (1, 0)")
    await db.commit()
    return db


async def checkpoint(db: aiosqlite.Connection) -> int:
    async with db.execute("SELECT seq FROM checkpoint WHERE id = 1") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


Handler = Callable[[aiosqlite.Connection, Event, StoredEvent], Awaitable[None]]
HANDLERS: dict[type[Event], Handler] = {}


def handles(*types: type[Event]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for t in types:
            HANDLERS[t] = fn
        return fn

    return register


def _t(stored: StoredEvent) -> str:
    return stored.time.isoformat()


async def _touch_run(db: aiosqlite.Connection, run_id: str, stored: StoredEvent, **fields: object) -> None:
    sets = "".join(f", {k} = ?" for k in fields)
    await db.execute(
        f"UPDATE runs SET version = ?, updated_at = ?{sets} WHERE id = ?",
        (stored.seq, _t(stored), *fields.values(), run_id),
    )


@handles(RunCreated)
async def _run_created(db, e: RunCreated, s: StoredEvent) -> None:
    await db.execute(
        "INSERT OR IGNORE INTO runs (id, status, version, created_at, updated_at) VALUES (?, 'created', ?, ?, ?)",
        (e.run_id, s.seq, _t(s), _t(s)),
    )


@handles(DataUnitAdded)
async def _unit_added(db, e: DataUnitAdded, s: StoredEvent) -> None:
    await db.execute(
        "INSERT OR IGNORE INTO data_units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (e.unit_id, e.run_id, e.data_kind, json.dumps(e.ancestors), e.filename, e.size, e.sha256,
         e.blob, e.step_id, s.seq, _t(s)),
    )
    await db.execute(
        "UPDATE runs SET status = 'running' WHERE id = ? AND status = 'complete'", (e.run_id,)
    )
    await _touch_run(db, e.run_id, s)


@handles(RunStarted)
async def _run_started(db, e: RunStarted, s: StoredEvent) -> None:
    await _touch_run(db, e.run_id, s, status="running", param_pool=json.dumps(e.param_pool),
                     max_parallel=e.max_parallel)


@handles(StepScheduled)
async def _step_scheduled(db, e: StepScheduled, s: StoredEvent) -> None:
    cur = await db.execute(
        "INSERT OR IGNORE INTO steps (id, run_id, operator, revision, status, inputs, seq, scheduled_at)"
        " VALUES (?, ?, ?, ?, 'created', ?, ?, ?)",
        (e.step_id, e.run_id, e.operator, e.revision,
         json.dumps({i.env: i.unit_id for i in e.inputs}), s.seq, _t(s)),
    )
    if cur.rowcount:
        await db.execute("UPDATE runs SET steps_total = steps_total + 1 WHERE id = ?", (e.run_id,))
    await _touch_run(db, e.run_id, s)


@handles(StepStarted)
async def _step_started(db, e: StepStarted, s: StoredEvent) -> None:
    await db.execute(
        "UPDATE steps SET status = 'running', attempt = ?, target = ?, external_id = ?,"
        " started_at = COALESCE(started_at, ?) WHERE id = ? AND status IN ('created', 'running')",
        (e.attempt, e.target, e.external_id, _t(s), e.step_id),
    )
    await _touch_run(db, e.run_id, s)


@handles(StepAttemptFailed)
async def _attempt_failed(db, e: StepAttemptFailed, s: StoredEvent) -> None:
    await db.execute(
        "INSERT OR REPLACE INTO step_attempts VALUES (?, ?, 'failed', ?, ?, ?)",
        (e.step_id, e.attempt, e.error, e.logs_blob, _t(s)),
    )
    await db.execute("UPDATE steps SET error = ? WHERE id = ?", (e.error, e.step_id))
    await _touch_run(db, e.run_id, s)


OUTCOME_COLUMN = {"success": "steps_succeeded", "failure": "steps_failed", "cancelled": "steps_cancelled"}


@handles(StepSucceeded, StepFailed, StepCancelled)
async def _step_finished(db, e: StepSucceeded | StepFailed | StepCancelled, s: StoredEvent) -> None:
    if isinstance(e, StepSucceeded):
        status, error, outputs, attempt, logs = "success", None, e.outputs, e.attempt, e.logs_blob
    elif isinstance(e, StepFailed):
        status, error, outputs, attempt, logs = "failure", e.error, [], e.attempt, e.logs_blob
    else:
        status, error, outputs, attempt, logs = "cancelled", e.reason, [], None, None
    cur = await db.execute(
        "UPDATE steps SET status = ?, error = ?, outputs = ?, finished_at = ?,"
        " attempt = COALESCE(?, attempt) WHERE id = ? AND status IN ('created', 'running')",
        (status, error, json.dumps(outputs), _t(s), attempt, e.step_id),
    )
    if cur.rowcount:
        column = OUTCOME_COLUMN[status]
        await db.execute(f"UPDATE runs SET {column} = {column} + 1 WHERE id = ?", (e.run_id,))
    if attempt is not None:
        await db.execute(
            "INSERT OR REPLACE INTO step_attempts VALUES (?, ?, ?, ?, ?, ?)",
            (e.step_id, attempt, status, error, logs, _t(s)),
        )
    await _touch_run(db, e.run_id, s)


@handles(RunTerminationRequested)
async def _termination(db, e: RunTerminationRequested, s: StoredEvent) -> None:
    await _touch_run(db, e.run_id, s, status="terminated", termination_reason=e.reason,
                     cancel_requested=int(e.cancel))


@handles(RunTerminated)
async def _terminated(db, e: RunTerminated, s: StoredEvent) -> None:
    await _touch_run(db, e.run_id, s, status="terminated")


@handles(RunCompleted)
async def _completed(db, e: RunCompleted, s: StoredEvent) -> None:
    await _touch_run(db, e.run_id, s, status="complete")


@handles(RunDeleted)
async def _deleted(db, e: RunDeleted, s: StoredEvent) -> None:
    await db.execute("DELETE FROM step_attempts WHERE step_id IN (SELECT id FROM steps WHERE run_id = ?)", (e.run_id,))
    for table in ("steps", "data_units"):
        await db.execute(f"DELETE FROM {table} WHERE run_id = ?", (e.run_id,))
    await db.execute("DELETE FROM runs WHERE id = ?", (e.run_id,))


@handles(DataKindDeclared)
async def _kind_declared(db, e: DataKindDeclared, s: StoredEvent) -> None:
    await db.execute("INSERT OR REPLACE INTO data_kinds VALUES (?, ?, ?)", (e.name, e.spec.model_dump_json(), s.seq))


@handles(DataKindDeleted)
async def _kind_deleted(db, e: DataKindDeleted, s: StoredEvent) -> None:
    await db.execute("DELETE FROM data_kinds WHERE name = ?", (e.name,))


@handles(OperatorDeclared)
async def _op_declared(db, e: OperatorDeclared, s: StoredEvent) -> None:
    await db.execute(
        "INSERT OR REPLACE INTO operators VALUES (?, ?, ?, ?)",
        (e.name, e.spec.model_dump_json(exclude_defaults=True), e.revision, s.seq),
    )


@handles(OperatorDeleted)
async def _op_deleted(db, e: OperatorDeleted, s: StoredEvent) -> None:
    await db.execute("DELETE FROM operators WHERE name = ?", (e.name,))


@handles(MachineRegistered, MachineUpdated)
async def _machine(db, e: MachineRegistered, s: StoredEvent) -> None:
    await db.execute(
        "INSERT INTO machines VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
        " url = excluded.url, labels = excluded.labels, has_token = excluded.has_token,"
        " updated_at = excluded.updated_at",
        (e.name, e.url, json.dumps(e.labels), int(e.token_ref is not None), _t(s), _t(s)),
    )


@handles(MachineDeleted)
async def _machine_deleted(db, e: MachineDeleted, s: StoredEvent) -> None:
    await db.execute("DELETE FROM machines WHERE name = ?", (e.name,))


async def apply(db: aiosqlite.Connection, stored: StoredEvent) -> None:
    handler = HANDLERS.get(type(stored.event))
    if handler is not None:
        await handler(db, stored.event, stored)


class Projector:
    def __init__(self, store: EventStore, db: aiosqlite.Connection) -> None:
        self.store = store
        self.db = db
        self.position = 0
        self._advanced = asyncio.Condition()

    async def run(self) -> None:
        self.position = await checkpoint(self.db)
        sub = await self.store.subscribe("mlynar.>", self.position + 1)
        batch: list[StoredEvent] = []
        try:
            async for stored in sub:
                batch.append(stored)
                if sub.pending == 0 or len(batch) >= BATCH:
                    await self._commit(batch, sub.last_seq)
                    batch = []
        finally:
            await sub.close()

    async def _commit(self, batch: list[StoredEvent], last_seq: int) -> None:
        try:
            for stored in batch:
                await apply(self.db, stored)
            await self.db.execute("UPDATE checkpoint SET seq = ? WHERE id = 1", (last_seq,))
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        async with self._advanced:
            self.position = last_seq
            self._advanced.notify_all()

    async def wait_for(self, seq: int, timeout: float = 10.0) -> bool:
        """True once the views include ``seq`` (read-your-writes for the API)."""
        if self.position >= seq:
            return True
        try:
            async with self._advanced:
                await asyncio.wait_for(self._advanced.wait_for(lambda: self.position >= seq), timeout)
            return True
        except asyncio.TimeoutError:
            return False


async def rebuild(store: EventStore, path: Path, progress: Callable[[int, int], None] | None = None) -> int:
    """Build the views from sequence 1 into a fresh file at ``path`` (replaced atomically)."""
    tmp = path.with_name(path.name + ".rebuild")
    for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
        p.unlink(missing_ok=True)
    db = await open_db(tmp)
    head = await store.last_seq()
    done = 0
    try:
        if head:
            sub = await store.subscribe("mlynar.>", 1)
            projector = Projector(store, db)
            batch: list[StoredEvent] = []
            try:
                async for stored in sub:
                    batch.append(stored)
                    done += 1
                    if len(batch) >= BATCH or sub.last_seq >= head:
                        await projector._commit(batch, sub.last_seq)
                        batch = []
                        if progress:
                            progress(sub.last_seq, head)
                    if sub.last_seq >= head:
                        break
            finally:
                await sub.close()
        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        await db.close()
    tmp.replace(path)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return done
