"""How code gets at the views' SQLite database without paying a thread hop per statement.

aiosqlite runs every call (``execute``, ``fetchone``, ``commit``, closing a cursor...) on its
connection's own thread, and each call is a hop there and back through the event loop; under load
the hop also waits for the GIL, which the busy event loop thread holds. Those hops, not SQLite,
were most of the time of a projector batch (a few statements per event) and of a
``GET /api/run/{id}`` (three queries, three hops each). So:

* the live projector runs a whole batch as one plain function on aiosqlite's thread
  (:func:`in_db_thread`): one hop per batch, ordered with every other call on that connection
  (a rebuild, which serves nobody meanwhile, applies its batches without any thread);
* the hottest reads run synchronously on the event loop thread over a second, query-only
  connection (:func:`reader`): a few indexed SELECTs cost less than one hop. In WAL mode a reader
  never waits for the writer and only sees committed transactions, so it sees a projector batch
  whole or not at all, and every batch ``Projector.wait_for`` reported (read-your-writes).
"""

from __future__ import annotations

import sqlite3
import weakref
from typing import Callable, TypeVar

import aiosqlite

T = TypeVar("T")

READER_BUSY_TIMEOUT = 1.0
"""Seconds a read may wait for a lock. In WAL mode readers don't take part in the writer's locks;
this only bounds how long the event loop could block in a pathological case (recovery)."""

_readers: weakref.WeakKeyDictionary[aiosqlite.Connection, sqlite3.Connection] = weakref.WeakKeyDictionary()


async def in_db_thread(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn(conn)`` on aiosqlite's thread with its ``sqlite3.Connection``, awaited.

    aiosqlite has no public call for this: ``_execute`` (queue a callable on the connection's
    thread) and ``_conn`` are what its own public methods are built on."""
    return await db._execute(lambda: fn(db._conn))


async def reader(db: aiosqlite.Connection) -> sqlite3.Connection:
    """A query-only connection to ``db``'s file for synchronous reads on the event loop thread
    (opened on first use, closed when ``db`` is garbage-collected). Read each statement to its
    end (``fetchall``) so that its read transaction ends and the next one sees newer commits."""
    conn = _readers.get(db)
    if conn is None:
        rows = await db.execute_fetchall("SELECT file FROM pragma_database_list WHERE name = 'main'")
        conn = _readers.get(db) or _open_reader(db, rows[0][0])  # another request may have won
    return conn


def _open_reader(db: aiosqlite.Connection, path: str) -> sqlite3.Connection:
    if not path:
        raise ValueError("the views' database has no file: a second connection would not see it")
    # check_same_thread off only so that the finalizer may close it from any thread
    conn = sqlite3.connect(path, timeout=READER_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA query_only = ON")
    _readers[db] = conn
    weakref.finalize(db, conn.close)
    return conn
