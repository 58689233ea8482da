"""A run's commands: create, add an uploaded unit, start (with its
parameter pool, :func:`parse_param_pool`), terminate, delete.

Next to the registry's commands (:mod:`.registry`): each folds the run from the stream (not from
the views, which may lag), checks the state (raising :mod:`.errors`, which the API answers as
4xx) and appends with the run's version as the expected sequence; a conflict means someone else
(the solver, an executor) appended first, so the command reloads and decides again. The HTTP
handlers in ``api/runs.py`` only parse, call these and render.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from .blobs import BlobStore, run_prefix
from .errors import Conflict, Invalid, NotFound
from .events import DataUnitAdded, Event, RunCreated, RunDeleted, RunStarted, RunTerminationRequested
from .registry import Registry
from .runstate import RunState, RunStateCache
from .store import ConcurrencyConflict, EventStore

RETRIES = 20


class ParamIn(BaseModel):
    """One parameter in Mlynar's ``/run`` body: ``{"name", "value", "defaultValue"?}``."""

    model_config = ConfigDict(extra="ignore")
    name: str
    value: str | int | float | bool | None = None
    defaultValue: str | None = None


async def load_run(runs: RunStateCache, run_id: str) -> RunState:
    """The run's state, caught up with the stream; 404 if it does not exist (or was deleted)."""
    state = await runs.get(run_id)
    if not state.exists:
        raise NotFound(f"run {run_id!r} does not exist")
    return state


async def decide_and_append(
    store: EventStore, runs: RunStateCache, run_id: str, decide: Callable[[RunState], Event | None],
    actor: str, msg_id: str | None = None,
) -> tuple[RunState, int | None]:
    """Fold the run, let ``decide`` check the state (raising command errors) and return the event
    to append, append it conditionally; on a conflict do it all again."""
    for _ in range(RETRIES):
        state = await load_run(runs, run_id)
        event = decide(state)
        if event is None:
            return state, None
        try:
            ack = await store.append(event, actor=actor, msg_id=msg_id, expected_seq=state.version)
        except ConcurrencyConflict:
            continue
        if ack.seq > state.version:
            state.apply(event, ack.seq)
        return state, ack.seq
    raise Conflict(f"run {run_id!r} is changing too fast; try again")


async def create(store: EventStore, actor: str) -> tuple[str, int]:
    """A new, empty run owned by ``actor`` (the principal creating it): its id and the sequence
    of its ``RunCreated``."""
    run_id = str(uuid.uuid4())
    ack = await store.append(RunCreated(run_id=run_id, owner=actor), actor=actor, msg_id=f"{run_id}:created",
                             expected_seq=0)
    return run_id, ack.seq


def check_upload_allowed(state: RunState) -> None:
    if state.status == "terminated":
        raise Conflict(f"run {state.run_id!r} is terminated; it takes no more data")


async def add_uploaded_unit(store: EventStore, runs: RunStateCache, unit: DataUnitAdded, actor: str) -> int:
    """Append an uploaded unit whose bytes are already in the blob store.

    Not conditional on the run's version: a unit never conflicts with the steps being scheduled
    meanwhile, and many uploads into one busy run must not turn into 409s. A termination racing
    this upload lets the unit in; a terminated run schedules nothing. Conditional only on the
    run not having been deleted since the check (``unless=RunDeleted``): a unit appended after
    its run's deletion would point at bytes the deletion removed."""
    check_upload_allowed(await load_run(runs, unit.run_id))
    try:
        return (await store.append(unit, actor=actor, msg_id=f"unit:{unit.unit_id}", unless=RunDeleted)).seq
    except ConcurrencyConflict:
        raise NotFound(f"run {unit.run_id!r} does not exist") from None


async def start(store: EventStore, runs: RunStateCache, run_id: str, param_pool: dict[str, dict[str, str]],
                max_parallel: int, actor: str) -> int | None:
    def decide(state: RunState) -> Event:
        if state.status != "created":
            raise Conflict(f"run {run_id!r} is {state.status}; only a created run can be started")
        return RunStarted(run_id=run_id, param_pool=param_pool, max_parallel=max_parallel)

    return (await decide_and_append(store, runs, run_id, decide, actor))[1]


async def terminate(store: EventStore, runs: RunStateCache, run_id: str, cancel: bool, actor: str) -> int | None:
    def decide(state: RunState) -> Event:
        if state.status == "terminated":
            raise Conflict(f"run {run_id!r} is already terminated")
        return RunTerminationRequested(run_id=run_id, cancel=cancel,
                                       reason="terminated by user" + (" (steps cancelled)" if cancel else ""))

    return (await decide_and_append(store, runs, run_id, decide, actor))[1]


async def delete(store: EventStore, runs: RunStateCache, blobs: BlobStore, run_id: str, actor: str) -> int | None:
    """Delete a run that is not running: its ``RunDeleted``, then its blobs."""
    def decide(state: RunState) -> Event:
        if state.status == "running":
            raise Conflict(f"run {run_id!r} is running; terminate it first")
        return RunDeleted(run_id=run_id)

    _, seq = await decide_and_append(store, runs, run_id, decide, actor)
    await blobs.delete_prefix(run_prefix(run_id))
    return seq


def parse_param_pool(body: Any, registry: Registry) -> dict[str, dict[str, str]]:
    """Mlynar's ``{op: [{name, value, defaultValue}]}`` (or ``{op: {name: value}}``) into
    ``{op: {name: value}}``; unknown operators and parameters are 400s."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise Invalid("the param pool must be a JSON object keyed by operator name")
    pool: dict[str, dict[str, str]] = {}
    problems = []
    for op, params_ in body.items():
        if op not in registry.operators:
            problems.append(f"unknown operator {op!r}")
            continue
        known = {e.name for e in registry.operators[op][0].configurableEnv}
        if isinstance(params_, dict):
            items = [ParamIn(name=k, value=v) for k, v in params_.items()]
        elif isinstance(params_, list):
            try:
                items = [ParamIn.model_validate(p) for p in params_]
            except Exception as exc:  # pydantic error: wrong element shape
                problems.append(f"{op}: malformed parameter list ({str(exc).splitlines()[0]})")
                continue
        else:
            problems.append(f"{op}: parameters must be a list or an object")
            continue
        values = {}
        for p in items:
            if p.name not in known:
                problems.append(f"operator {op!r} has no configurable parameter {p.name!r} (has {sorted(known)})")
            elif p.value is not None:
                values[p.name] = str(p.value).lower() if isinstance(p.value, bool) else str(p.value)
        pool[op] = values
    if problems:
        raise Invalid("invalid param pool", problems)
    return pool
