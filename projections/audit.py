"""The projection side of ``mlynar audit verify``: do the live views say what the stream says?

The stream is replayed into a fresh database up to exactly the live views' checkpoint (by the
same handlers a live projector uses, :func:`projections.projector.rebuild`) and compared table
by table, row by row, keyed by each table's primary key, so a finding names the table, the row
and the column that differ. The live database is read in one read transaction (WAL snapshot),
so a projector committing meanwhile cannot make the two disagree.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mlynar_events.audit import Finding
from mlynar_events.store import EventStore

from .projector import rebuild
from .schema import VIEW_TABLES


def _snapshot(conn: sqlite3.Connection) -> tuple[int, dict[str, dict[tuple, dict[str, object]]]]:
    """The checkpoint and every view as {primary key: {column: value}}, in one transaction."""
    conn.execute("BEGIN")
    try:
        seq = conn.execute("SELECT seq FROM checkpoint WHERE id = 1").fetchone()[0]
        tables = {}
        for table in VIEW_TABLES:
            info = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
            if not info:
                continue
            columns = [c[1] for c in info]
            key = [i for _, i in sorted((c[5], n) for n, c in enumerate(info) if c[5])] or [0]
            rows = {}
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                rows[tuple(row[i] for i in key)] = dict(zip(columns, row))
            tables[table] = rows
        return seq, tables
    finally:
        conn.rollback()


def compare(live: dict[str, dict[tuple, dict[str, object]]], replay: dict[str, dict[tuple, dict[str, object]]],
            limit: int = 50) -> list[Finding]:
    out: list[Finding] = []
    for table in VIEW_TABLES:
        a, b = live.get(table, {}), replay.get(table, {})
        for key in sorted(set(a) | set(b), key=repr):
            name = f"{table} row {'/'.join(map(str, key))}"
            if key not in b:
                out.append(Finding(f"{name} is in the live views but not in the replay of the stream"))
            elif key not in a:
                out.append(Finding(f"{name} is missing from the live views"))
            else:
                for column, value in a[key].items():
                    if b[key].get(column) != value:
                        out.append(Finding(f"{name}: {column} is {value!r} in the live views but "
                                           f"{b[key].get(column)!r} in the replay"))
            if len(out) >= limit:
                return out
    return out


async def verify_views(store: EventStore, live_db: Path, workdir: Path) -> tuple[list[Finding], int]:
    """Findings of live views against a replay, and the sequence both were compared at."""
    conn = sqlite3.connect(f"file:{live_db}?mode=ro", uri=True, isolation_level=None)
    try:
        seq, live = _snapshot(conn)
    finally:
        conn.close()
    replay_path = workdir / "audit-replay.sqlite3"
    await rebuild(store, replay_path, until=seq)
    replay_conn = sqlite3.connect(replay_path, isolation_level=None)
    try:
        _, replay = _snapshot(replay_conn)
    finally:
        replay_conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(replay_path) + suffix).unlink(missing_ok=True)
    return compare(live, replay), seq
