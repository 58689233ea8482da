"""Realistic events and specs for the benchmarks."""

from __future__ import annotations

import hashlib
import uuid
from typing import Iterator

from mlynar_events.events import (
    DataUnitAdded, Event, RunCompleted, RunCreated, RunStarted, StepScheduled, StepStarted,
    StepSucceeded,
)
from mlynar_events.solver import step_id_for
from mlynar_events.specs import OperatorSpec

SHA = hashlib.sha256(b"bench").hexdigest()

OPERATOR = OperatorSpec.model_validate({
    "machine": "nowhere",
    "command": ["python3", "/opt/bench/op.py", "--flag"],
    "inputs": [{"fileLocationEnv": "INPUT_ARRAY", "dataKind": "bench-in"}],
    "possibleOutputKinds": ["bench-out"],
    "configurableEnv": [{"name": "MULTIPLY_BY", "defaultValue": "1"}],
    "constantEnv": [{"name": "SOME_ENV_VAR", "value": "SOME_VALUE"}],
    "timeoutSeconds": 60,
})


def unit(run_id: str, unit_id: str | None = None, kind: str = "bench-in", ancestors: list[str] | None = None,
         step_id: str | None = None, index: int | None = None) -> DataUnitAdded:
    unit_id = unit_id or str(uuid.uuid4())
    return DataUnitAdded(run_id=run_id, unit_id=unit_id, data_kind=kind, ancestors=ancestors or [],
                         blob=f"runs/{run_id}/units/{unit_id}", size=1234, sha256=SHA, filename="numbers.json",
                         step_id=step_id, output_index=index)


def run_history(run_id: str, units: int, op: str = "bench-op") -> Iterator[Event]:
    """A finished run: created, ``units`` uploads, started, one succeeded step per unit."""
    yield RunCreated(run_id=run_id)
    inputs = [unit(run_id) for _ in range(units)]
    yield from inputs
    yield RunStarted(run_id=run_id, param_pool={op: {"MULTIPLY_BY": "2"}}, max_parallel=8)
    for u in inputs:
        step_id = step_id_for(run_id, op, (("INPUT_ARRAY", u.unit_id),))
        yield StepScheduled(
            run_id=run_id, step_id=step_id, operator=op, revision=1, spec=OPERATOR,
            inputs=[{"env": "INPUT_ARRAY", "unit_id": u.unit_id, "data_kind": u.data_kind, "blob": u.blob,
                     "filename": u.filename}],
            env={"SOME_ENV_VAR": "SOME_VALUE", "MULTIPLY_BY": "2"}, ancestors=[op])
        yield StepStarted(run_id=run_id, step_id=step_id, attempt=1, executor="executor:bench:abcdef",
                          target="machine:nowhere", external_id=f"{step_id}-1")
        out = unit(run_id, kind="bench-out", ancestors=[op], step_id=step_id, index=0)
        yield out
        yield StepSucceeded(run_id=run_id, step_id=step_id, attempt=1, outputs=[out.unit_id],
                            logs_blob=f"runs/{run_id}/logs/{step_id}-1.txt")
    yield RunCompleted(run_id=run_id)


def history(total: int, units_per_run: int = 50) -> Iterator[Event]:
    """At least ``total`` events of whole runs (the last run is cut at ``total``)."""
    n = 0
    while True:
        for event in run_history(str(uuid.uuid4()), units_per_run):
            yield event
            n += 1
            if n >= total:
                return
