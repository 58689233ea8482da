"""Run commands racing each other: an upload never lands in a deleted run."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from mlynar_events.events import SUBJECT_PREFIX, DataUnitAdded, RunCreated, RunDeleted
from mlynar_events.store import ConcurrencyConflict, EventStore, run_filter
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


async def test_a_late_start_of_an_older_attempt_changes_neither_the_fold_nor_the_views(store: EventStore,
                                                                                        tmp_path) -> None:
    """``StepStarted`` of attempt 1 appended after attempt 2's (a retry outside the duplicate
    window): the run's fold (what the executor re-attaches by) and the views keep attempt 2."""
    from mlynar_events.events import StepInput, StepScheduled, StepStarted
    from mlynar_events.runstate import RunState
    from mlynar_events.specs import OperatorSpec
    from projections.projector import rebuild

    run_id = str(uuid.uuid4())
    spec = OperatorSpec.model_validate({"machine": "local", "command": ["true"], "possibleOutputKinds": ["k"],
                                        "inputs": [{"fileLocationEnv": "IN", "dataKind": "k"}]})
    await store.append(RunCreated(run_id=run_id), actor="test")
    await store.append(StepScheduled(run_id=run_id, step_id="s1", operator="op", revision=1, spec=spec, env={},
                                     ancestors=["op"], inputs=[StepInput(env="IN", unit_id="u", data_kind="k",
                                                                         blob="b", filename="f")]), actor="test")
    for attempt in (2, 1):
        await store.append(StepStarted(run_id=run_id, step_id="s1", attempt=attempt, executor="e",
                                       target="machine:local", external_id=f"s1-{attempt}"), actor="test")
    fold = RunState.from_events(run_id, await store.read(run_filter(run_id)))
    assert fold.steps["s1"].attempt == 2 and fold.steps["s1"].started.external_id == "s1-2"
    db = tmp_path / "views.db"
    await rebuild(store, db)
    import sqlite3

    row = sqlite3.connect(db).execute("SELECT attempt, external_id FROM steps WHERE id = 's1'").fetchone()
    assert row == (2, "s1-2")
