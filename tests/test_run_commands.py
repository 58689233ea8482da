"""Run commands racing each other: an upload never lands in a deleted run."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from mlynar_events.events import SUBJECT_PREFIX, DataUnitAdded, RunCreated, RunDeleted
from mlynar_events.store import ConcurrencyConflict, EventStore
from support import Api


def unit(run_id: str) -> DataUnitAdded:
    return DataUnitAdded(run_id=run_id, unit_id=str(uuid.uuid4()), data_kind="k", blob="b", size=1, sha256="0" * 64)


async def test_an_append_unless_deleted_is_refused_after_the_deletion(store: EventStore) -> None:
    run_id = str(uuid.uuid4())
    await store.append(RunCreated(run_id=run_id), actor="test")
    assert (await store.append(unit(run_id), actor="test", unless=RunDeleted)).seq  # not deleted: in
    await store.append(RunDeleted(run_id=run_id), actor="test")
    head = await store.last_seq()
    with pytest.raises(ConcurrencyConflict):
        await store.append(unit(run_id), actor="test", unless=RunDeleted)
    assert await store.last_seq() == head  # nothing appended


async def test_uploads_racing_a_delete_leave_no_unit_after_it(api: Api) -> None:
    run_id = await api.create_run()

    async def upload() -> int:
        return (await api.upload(run_id, "number-array-json", b"[1]"))[0]

    uploads = [asyncio.ensure_future(upload()) for _ in range(20)]
    deleted = await api.call("DELETE", f"/api/run/{run_id}")
    statuses = await asyncio.gather(*uploads)
    assert deleted[0] == 200
    assert set(statuses) <= {201, 404, 409}, statuses
    events = await api.service.store.read(f"{SUBJECT_PREFIX}.run.{run_id}.>")
    deletion = next(e.seq for e in events if isinstance(e.event, RunDeleted))
    assert not [e for e in events if isinstance(e.event, DataUnitAdded) and e.seq > deletion]
    blobs = api.service.settings.resolved_blob_dir
    assert not [p for p in blobs.rglob("*") if p.is_file() and run_id in str(p)]
