"""Time travel: a run as it was right after any event of the stream.

``GET /api/run/{id}?at=<seq>`` answers the same JSON as the live view, computed by folding the
history and not read from the projection: the run's events up to ``seq`` and the operator
declarations up to ``seq`` (parameter defaults come from the operator as it was declared then)
are applied by the projector's own handlers to a fresh in-memory database, and the run is
rendered by the one renderer (:data:`projections.queries.RUN_BODY_SQL`). So the past and the
present can never disagree on what a run looks like, only on what had happened by then.
"""

from __future__ import annotations

import sqlite3

from mlynar_events.events import key_filter, of_aggregate, subject_filters
from mlynar_events.store import EventStore

from .projector import apply_batch, prepare
from .queries import RUN_BODY_SQL


async def run_body_at(store: EventStore, run_id: str, at: int, base: str) -> str | None:
    """The run's body right after event ``at`` (JSON text), or None if it did not exist then."""
    events = [e for e in await store.read(key_filter("run", run_id)) if e.seq <= at]
    if not events:
        return None
    [operators] = subject_filters(of_aggregate("operator"))  # every operator event: one filter
    registry = [e for e in await store.read(operators) if e.seq <= at]
    conn = sqlite3.connect(":memory:")
    try:
        prepare(conn)
        apply_batch(conn, sorted(events + registry, key=lambda e: e.seq), at)
        rows = conn.execute(RUN_BODY_SQL, {"id": run_id, "base": base}).fetchall()
    finally:
        conn.close()
    return rows[0][0] if rows else None
