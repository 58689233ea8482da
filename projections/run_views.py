"""The run views (``runs``, ``steps``, ``step_attempts``, ``data_units``): what each run event
does to them. Statuses come from :mod:`mlynar_events.runstate`, the one state machine."""

from __future__ import annotations

import json

from mlynar_events.events import (
    DataUnitAdded, RunCompleted, RunCreated, RunDeleted, RunStarted, RunTerminated,
    RunTerminationRequested, StepAttemptFailed, StepCancelled, StepFailed, StepScheduled,
    StepStarted, StepSucceeded,
)
from mlynar_events.runstate import RUN_STATUS_AFTER, STEP_STATUS_AFTER

from .batch import Batch, handles


@handles(RunCreated)
def _run_created(b: Batch, e: RunCreated, seq: int, at: str) -> None:
    if b.execute(
        "INSERT OR IGNORE INTO runs (id, status, owner, version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        (e.run_id, RUN_STATUS_AFTER[RunCreated], e.owner, seq, at, at),
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
    b.touch(e.run_id, seq, at, status=RUN_STATUS_AFTER[RunStarted], param_pool=json.dumps(e.param_pool),
            max_parallel=e.max_parallel, started_at=at)


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
        " started_at = COALESCE(started_at, ?) WHERE id = ? AND status IN ('created', 'running') AND attempt <= ?",
        (STEP_STATUS_AFTER[StepStarted], e.attempt, e.target, e.external_id, at, e.step_id, e.attempt),
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
