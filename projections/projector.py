"""The projector: applies the stream, in order, to the SQLite read views.

Each batch of events and the checkpoint are written in one transaction, so every event is applied
exactly once even across crashes. ``wait_for(seq)`` lets the API answer only after the views show
its own append (read-your-writes).

The handlers are plain synchronous functions over a ``sqlite3.Connection``, and a whole batch
(handlers, merged run updates, checkpoint, commit) is one call of :func:`apply_batch`: live, in
one hop to aiosqlite's thread (:func:`projections.connection.in_db_thread`) instead of one hop
per statement; in a rebuild, right on the event loop thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiosqlite

from mlynar_events.events import (
    DataKindDeclared, DataKindDeleted, DataUnitAdded, Event, MachineDeleted, MachineRegistered,
    MachineUpdated, OperatorDeclared, OperatorDeleted, RunCompleted, RunCreated, RunDeleted,
    RunStarted, RunTerminated, RunTerminationRequested, StepAttemptFailed, StepCancelled,
    CATALOGUE, StepFailed, StepScheduled, StepStarted, StepSucceeded, StoredEvent, subject_filters,
)
from mlynar_events.store import EventStore, Subscription

from mlynar_events.runstate import RUN_STATUS_AFTER, STEP_STATUS_AFTER

from .connection import in_db_thread
from .schema import DDL, SCHEMA_VERSION

log = logging.getLogger("mlynar.projector")

BATCH = 500
"""Live: a batch also ends whenever the subscription has nothing pending, so this only bounds
how long a read-your-writes waiter can be held up behind a backlog."""
REBUILD_BATCH = 5000
"""Rebuild into a fresh file: nobody waits for it, so fewer, bigger transactions."""


async def open_db(path: Path) -> aiosqlite.Connection:
    """The views' database for the service: aiosqlite, schema ready (see :func:`prepare`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path)
    db.row_factory = aiosqlite.Row
    await in_db_thread(db, prepare)
    return db


def prepare(conn: sqlite3.Connection) -> None:
    """WAL (readers never wait for the projector), no fsync per commit (the stream is the truth:
    a projection that lost its last commits catches up from its checkpoint), and the schema: a
    database of another schema version is emptied, to be rebuilt from the stream."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=OFF")
    version = None
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        version = int(row[0]) if row else None
    except sqlite3.OperationalError:
        pass
    if version is not None and version != SCHEMA_VERSION:
        log.warning("projection schema changed; rebuilding from the stream", extra={"old": version})
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()]
        for table in tables:
            conn.execute(f'DROP TABLE "{table}"')
    conn.executescript(DDL)
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    conn.execute("INSERT OR IGNORE INTO checkpoint VALUES (1, 0)")
    conn.commit()


async def checkpoint(db: aiosqlite.Connection) -> int:
    async with db.execute("SELECT seq FROM checkpoint WHERE id = 1") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


# ---- one batch: the handlers and the merged run updates ---------------------------------------


@dataclass(slots=True)
class RunChanges:
    """What a batch's events did to one ``runs`` row, not yet written: assigned columns (the last
    value wins), counter increments, and whether a unit reopened a complete run."""

    sets: dict[str, object] = field(default_factory=dict)
    adds: dict[str, int] = field(default_factory=dict)
    reopen: bool = False

    def statement(self) -> str:
        parts = [f"{column} = ?" for column in self.sets]
        parts += [f"{column} = {column} + ?" for column in self.adds]
        if self.reopen:  # runstate.REOPEN on the row as it was before this batch, like the event order says
            parts.append("status = CASE status WHEN 'complete' THEN 'running' ELSE status END")
        return f"UPDATE runs SET {', '.join(parts)} WHERE id = ?"

    def args(self, run_id: str) -> tuple[object, ...]:
        return (*self.sets.values(), *self.adds.values(), run_id)


class Batch:
    """The events of one transaction applied on the ``sqlite3.Connection``.

    Nearly every run event touches its ``runs`` row (version, updated_at, counters, status); those
    changes are merged per run in memory and written once per run when the batch ends
    (:meth:`flush`), which is equivalent because nothing in a batch reads them back except a unit
    reopening a complete run, resolved here against the pending status."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.runs: dict[str, RunChanges] = {}

    def execute(self, sql: str, args: tuple = ()) -> int:
        """Run one statement; the number of rows it changed."""
        return self.conn.execute(sql, args).rowcount

    def apply(self, stored: StoredEvent) -> None:
        handler = HANDLERS.get(type(stored.event))
        if handler is not None:
            handler(self, stored.event, stored.seq, stored.time.isoformat())

    def touch(self, run_id: str, seq: int, at: str, **columns: object) -> None:
        """The run's version and updated_at move to this event (``seq``, at ``at``); ``columns``
        are set too."""
        changes = self._changes(run_id)
        changes.sets["version"] = seq
        changes.sets["updated_at"] = at
        if columns:
            changes.sets.update(columns)
            if "status" in columns:
                changes.reopen = False

    def add(self, run_id: str, column: str) -> None:
        """One more in the run's counter ``column``."""
        adds = self._changes(run_id).adds
        adds[column] = adds.get(column, 0) + 1

    def reopen(self, run_id: str) -> None:
        """A new unit makes a complete run running again (the solver may schedule from it)."""
        changes = self._changes(run_id)
        if "status" not in changes.sets:
            changes.reopen = True
        elif changes.sets["status"] == "complete":
            changes.sets["status"] = "running"

    def _changes(self, run_id: str) -> RunChanges:
        changes = self.runs.get(run_id)
        if changes is None:
            changes = self.runs[run_id] = RunChanges()
        return changes

    def forget(self, run_id: str) -> None:
        """Drop the run's pending changes: its row was deleted, or has just been created (so the
        changes came from events before it existed, which change nothing)."""
        self.runs.pop(run_id, None)

    def flush(self) -> None:
        """Write the merged run changes: one UPDATE per run, grouped by statement shape."""
        groups: dict[str, list[tuple[object, ...]]] = {}
        for run_id, changes in self.runs.items():
            groups.setdefault(changes.statement(), []).append(changes.args(run_id))
        for sql, rows in groups.items():
            self.conn.executemany(sql, rows)
        self.runs.clear()


def apply_batch(conn: sqlite3.Connection, events: list[StoredEvent], last_seq: int) -> None:
    """Apply ``events`` and move the checkpoint to ``last_seq`` in one transaction (exactly-once
    application: either both are stored or neither)."""
    batch = Batch(conn)
    with conn:  # commit, or roll back on any error
        for stored in events:
            batch.apply(stored)
        batch.flush()
        conn.execute("UPDATE checkpoint SET seq = ? WHERE id = 1", (last_seq,))


Handler = Callable[[Batch, Any, int, str], None]
"""``(batch, event, seq, at)``: the event's stream sequence and its time as ISO text."""
HANDLERS: dict[type[Event], Handler] = {}


def handles(*types: type[Event]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for t in types:
            HANDLERS[t] = fn
        return fn

    return register


@handles(RunCreated)
def _run_created(b: Batch, e: RunCreated, seq: int, at: str) -> None:
    if b.execute(
        "INSERT OR IGNORE INTO runs (id, status, version, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        (e.run_id, RUN_STATUS_AFTER[RunCreated], seq, at, at),
    ):
        b.forget(e.run_id)


@handles(DataUnitAdded)
def _unit_added(b: Batch, e: DataUnitAdded, seq: int, at: str) -> None:
    b.execute(
        "INSERT OR IGNORE INTO data_units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (e.unit_id, e.run_id, e.data_kind, json.dumps(e.ancestors), e.filename, e.size, e.sha256,
         e.blob, e.step_id, seq, at),
    )
    b.reopen(e.run_id)  # RUN_STATUS_AFTER[DataUnitAdded] is REOPEN
    b.touch(e.run_id, seq, at)


@handles(RunStarted)
def _run_started(b: Batch, e: RunStarted, seq: int, at: str) -> None:
    b.touch(e.run_id, seq, at, status=RUN_STATUS_AFTER[RunStarted], param_pool=json.dumps(e.param_pool), max_parallel=e.max_parallel)


@handles(StepScheduled)
def _step_scheduled(b: Batch, e: StepScheduled, seq: int, at: str) -> None:
    if b.execute(
        "INSERT OR IGNORE INTO steps (id, run_id, operator, revision, status, inputs, seq, scheduled_at)"
        " VALUES (?, ?, ?, ?, 'created', ?, ?, ?)",
        (e.step_id, e.run_id, e.operator, e.revision,
         json.dumps({i.env: i.unit_id for i in e.inputs}), seq, at),
    ):
        b.add(e.run_id, "steps_total")
    b.touch(e.run_id, seq, at)


@handles(StepStarted)
def _step_started(b: Batch, e: StepStarted, seq: int, at: str) -> None:
    b.execute(
        "UPDATE steps SET status = ?, attempt = ?, target = ?, external_id = ?,"
        " started_at = COALESCE(started_at, ?) WHERE id = ? AND status IN ('created', 'running')",
        (STEP_STATUS_AFTER[StepStarted], e.attempt, e.target, e.external_id, at, e.step_id),
    )
    b.touch(e.run_id, seq, at)


@handles(StepAttemptFailed)
def _attempt_failed(b: Batch, e: StepAttemptFailed, seq: int, at: str) -> None:
    b.execute(
        "INSERT OR REPLACE INTO step_attempts VALUES (?, ?, 'failed', ?, ?, ?)",
        (e.step_id, e.attempt, e.error, e.logs_blob, at),
    )
    b.execute("UPDATE steps SET error = ? WHERE id = ?", (e.error, e.step_id))
    b.touch(e.run_id, seq, at)


OUTCOME_COLUMN = {"success": "steps_succeeded", "failure": "steps_failed", "cancelled": "steps_cancelled"}


@handles(StepSucceeded, StepFailed, StepCancelled)
def _step_finished(b: Batch, e: StepSucceeded | StepFailed | StepCancelled, seq: int, at: str) -> None:
    status, attempt, logs = STEP_STATUS_AFTER[type(e)], e.attempt, e.logs_blob
    if isinstance(e, StepSucceeded):
        error, outputs = None, e.outputs
    elif isinstance(e, StepFailed):
        error, outputs = e.error, []
    else:
        error, outputs = e.reason, []
    if b.execute(
        "UPDATE steps SET status = ?, error = ?, outputs = ?, finished_at = ?,"
        " attempt = COALESCE(?, attempt) WHERE id = ? AND status IN ('created', 'running')",
        (status, error, json.dumps(outputs), at, attempt, e.step_id),
    ):
        b.add(e.run_id, OUTCOME_COLUMN[status])
    if attempt is not None:
        b.execute(
            "INSERT OR REPLACE INTO step_attempts VALUES (?, ?, ?, ?, ?, ?)",
            (e.step_id, attempt, status, error, logs, at),
        )
    b.touch(e.run_id, seq, at)


@handles(RunTerminationRequested)
def _termination(b: Batch, e: RunTerminationRequested, seq: int, at: str) -> None:
    b.touch(e.run_id, seq, at, status=RUN_STATUS_AFTER[RunTerminationRequested], termination_reason=e.reason, cancel_requested=int(e.cancel))


@handles(RunTerminated)
def _terminated(b: Batch, e: RunTerminated, seq: int, at: str) -> None:
    b.touch(e.run_id, seq, at, status=RUN_STATUS_AFTER[RunTerminated])


@handles(RunCompleted)
def _completed(b: Batch, e: RunCompleted, seq: int, at: str) -> None:
    b.touch(e.run_id, seq, at, status=RUN_STATUS_AFTER[RunCompleted])


@handles(RunDeleted)
def _deleted(b: Batch, e: RunDeleted, seq: int, at: str) -> None:
    b.forget(e.run_id)
    b.execute("DELETE FROM step_attempts WHERE step_id IN (SELECT id FROM steps WHERE run_id = ?)", (e.run_id,))
    for table in ("steps", "data_units"):
        b.execute(f"DELETE FROM {table} WHERE run_id = ?", (e.run_id,))
    b.execute("DELETE FROM runs WHERE id = ?", (e.run_id,))


@handles(DataKindDeclared)
def _kind_declared(b: Batch, e: DataKindDeclared, seq: int, at: str) -> None:
    b.execute("INSERT OR REPLACE INTO data_kinds VALUES (?, ?, ?)", (e.name, e.spec.model_dump_json(), seq))


@handles(DataKindDeleted)
def _kind_deleted(b: Batch, e: DataKindDeleted, seq: int, at: str) -> None:
    b.execute("DELETE FROM data_kinds WHERE name = ?", (e.name,))


@handles(OperatorDeclared)
def _op_declared(b: Batch, e: OperatorDeclared, seq: int, at: str) -> None:
    b.execute(
        "INSERT OR REPLACE INTO operators VALUES (?, ?, ?, ?)",
        (e.name, e.spec.model_dump_json(exclude_defaults=True), e.revision, seq),
    )


@handles(OperatorDeleted)
def _op_deleted(b: Batch, e: OperatorDeleted, seq: int, at: str) -> None:
    b.execute("DELETE FROM operators WHERE name = ?", (e.name,))


@handles(MachineRegistered, MachineUpdated)
def _machine(b: Batch, e: MachineRegistered, seq: int, at: str) -> None:
    b.execute(
        "INSERT INTO machines VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
        " url = excluded.url, labels = excluded.labels, has_token = excluded.has_token,"
        " updated_at = excluded.updated_at",
        (e.name, e.url, json.dumps(e.labels), int(e.token_ref is not None), at, at),
    )


@handles(MachineDeleted)
def _machine_deleted(b: Batch, e: MachineDeleted, seq: int, at: str) -> None:
    b.execute("DELETE FROM machines WHERE name = ?", (e.name,))


# ---- following the stream ---------------------------------------------------------------------


Commit = Callable[[list[StoredEvent], int], Awaitable[None]]
"""Apply a batch of events and move the checkpoint to the given sequence, in one transaction."""


async def follow(
    sub: Subscription, commit: Commit, batch_size: int, head: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Apply ``sub``'s events in batches; a batch is committed when full, when nothing more is
    pending (so a live projection is never held back waiting for a full batch), or at ``head``,
    where following stops (a rebuild). Returns how many events were applied.

    Reading the next batch while the previous one commits was measured slower, not faster: both
    are Python holding the GIL, and two threads only fight over it."""
    batch: list[StoredEvent] = []
    applied = 0
    async for stored in sub:
        batch.append(stored)
        at_head = head is not None and sub.last_seq >= head
        if at_head or sub.pending == 0 or len(batch) >= batch_size:
            await commit(batch, sub.last_seq)
            applied += len(batch)
            batch = []
            if progress is not None and head is not None:
                progress(sub.last_seq, head)
        if at_head:
            break
    return applied


class Projector:
    CONSUMES = tuple(CATALOGUE.values())
    """Every event: the views need most of them, and the position it checkpoints (and the API
    waits on for read-your-writes) must pass through every sequence of the stream."""

    def __init__(self, store: EventStore, db: aiosqlite.Connection) -> None:
        self.store = store
        self.db = db
        self.position = 0
        self._advanced = asyncio.Condition()

    async def run(self) -> None:
        self.position = await checkpoint(self.db)
        sub = await self.store.subscribe(subject_filters(self.CONSUMES), self.position + 1)
        try:
            await follow(sub, self._commit, BATCH)
        finally:
            await sub.close()

    async def _commit(self, batch: list[StoredEvent], last_seq: int) -> None:
        """The batch in one hop to aiosqlite's thread (the event loop keeps serving the API)."""
        await in_db_thread(self.db, lambda conn: apply_batch(conn, batch, last_seq))
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
    """Build the views from sequence 1 into a fresh file at ``path`` (replaced atomically).

    Batches are applied right on the event loop thread over a plain ``sqlite3`` connection: a
    rebuild serves nobody meanwhile (the service is stopped), and without a second thread there
    is no GIL contention (measured ~15% faster than hopping to a database thread)."""
    tmp = path.with_name(path.name + ".rebuild")
    for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
        p.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(tmp)
    done = 0
    try:
        prepare(conn)

        async def commit(batch: list[StoredEvent], last_seq: int) -> None:
            apply_batch(conn, batch, last_seq)

        head = await store.last_seq()
        if head:
            sub = await store.subscribe(subject_filters(Projector.CONSUMES), 1)
            try:
                done = await follow(sub, commit, REBUILD_BATCH, head, progress)
            finally:
                await sub.close()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    tmp.replace(path)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return done
