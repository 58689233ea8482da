"""One transaction of the projector: the handler table and the merged ``runs`` row updates.

A handler is a plain synchronous function ``(batch, event, seq, at)`` over the batch's
``sqlite3.Connection``, registered for its event classes with :func:`handles`. The handlers live
with the view they maintain (:mod:`projections.run_views`, :mod:`projections.registry_views`);
:mod:`projections.projector` imports them all and applies batches.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any, Callable

from mlynar_events.events import Event, StoredEvent


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
        self.actor = ""  # the envelope's actor of the event being applied (who did it)

    def execute(self, sql: str, args: tuple = ()) -> int:
        """Run one statement; the number of rows it changed."""
        return self.conn.execute(sql, args).rowcount

    def apply(self, stored: StoredEvent) -> None:
        handler = HANDLERS.get(type(stored.event))
        if handler is not None:
            self.actor = stored.envelope.actor
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


Handler = Callable[[Batch, Any, int, str], None]
"""``(batch, event, seq, at)``: the event's stream sequence and its time as ISO text."""
HANDLERS: dict[type[Event], Handler] = {}


def handles(*types: type[Event]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for t in types:
            HANDLERS[t] = fn
        return fn

    return register
