"""A run's state folded from its own events: what the API decides commands from, what the
solver schedules from and what an executor checks before it starts or finishes a step.

``version`` is the stream sequence of the last event folded; appends decided from this state
pass it as ``expected_run_seq``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Literal

from .events import (
    DataUnitAdded, Event, RunCompleted, RunCreated, RunDeleted, RunStarted, RunTerminated,
    RunTerminationRequested, StepAttemptFailed, StepCancelled, StepFailed, StepScheduled,
    StepOutputReturned, StepStarted, StepSucceeded, StoredEvent,
)
from .store import EventStore, run_filter

RunStatus = Literal["created", "running", "complete", "terminated", "deleted"]
StepStatus = Literal["created", "running", "success", "failure", "cancelled"]
FINISHED: tuple[StepStatus, ...] = ("success", "failure", "cancelled")

REOPEN: Literal["reopen"] = "reopen"
"""A new unit makes a ``complete`` run ``running`` again (the solver may schedule from it) and
leaves any other status as it is."""

RUN_STATUS_AFTER: dict[type[Event], RunStatus | Literal["reopen"]] = {
    RunCreated: "created",
    DataUnitAdded: REOPEN,
    RunStarted: "running",
    RunTerminationRequested: "terminated",  # at once: nothing new is scheduled from here on
    RunTerminated: "terminated",
    RunCompleted: "complete",
    RunDeleted: "deleted",
}
"""The run status machine, the one place it is written: this fold and the projector's views
both apply it."""

STEP_STATUS_AFTER: dict[type[Event], StepStatus] = {
    StepStarted: "running",
    StepSucceeded: "success",
    StepFailed: "failure",
    StepCancelled: "cancelled",
}
"""A step's status after each of its events (a finished step never changes again)."""


def run_status_after(event: Event, current: RunStatus | None) -> RunStatus | None:
    change = RUN_STATUS_AFTER.get(type(event))
    if change is None:
        return current
    if change == REOPEN:
        return "running" if current == "complete" else current
    return change


@dataclass
class StepState:
    scheduled: StepScheduled
    status: StepStatus = "created"
    attempt: int = 0
    started: StepStarted | None = None
    error: str | None = None
    outputs: list[str] = field(default_factory=list)
    failed_attempts: set[int] = field(default_factory=set)
    """Attempts the operator failed (``StepAttemptFailed``): what ``spec.retries`` counts."""
    lost_attempts: set[int] = field(default_factory=set)
    """Attempts lost to the infrastructure (``StepAttemptFailed.infrastructure``): what the
    executor's own cap counts, never ``spec.retries``."""

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def attempt_ended(self) -> bool:
        """The current attempt has its ``StepAttemptFailed``: the next one is due, not a re-attach."""
        return self.attempt in self.failed_attempts or self.attempt in self.lost_attempts


@dataclass
class RunState:
    run_id: str
    status: RunStatus | None = None
    version: int = 0
    units: dict[str, DataUnitAdded] = field(default_factory=dict)
    steps: dict[str, StepState] = field(default_factory=dict)
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    max_parallel: int = 8
    started: bool = False
    termination: RunTerminationRequested | None = None
    terminated_final: bool = False
    active: int = 0  # steps scheduled and not finished
    owner: str | None = None  # the principal it belongs to (RunCreated)

    @property
    def exists(self) -> bool:
        return self.status is not None and self.status != "deleted"

    @classmethod
    def from_events(cls, run_id: str, events: Iterable[StoredEvent]) -> "RunState":
        state = cls(run_id)
        for stored in events:
            state.apply(stored.event, stored.seq)
        return state

    def apply(self, event: Event, seq: int) -> None:
        self.version = max(self.version, seq)
        self.status = run_status_after(event, self.status)
        match event:
            case RunCreated():
                self.owner = event.owner
            case DataUnitAdded():
                self.units[event.unit_id] = event
            case RunStarted():
                self.started = True
                self.params = event.param_pool
                self.max_parallel = event.max_parallel
            case StepScheduled():
                if event.step_id not in self.steps:
                    self.steps[event.step_id] = StepState(event)
                    self.active += 1
            case StepStarted():
                step = self.steps.get(event.step_id)
                # a late StepStarted of an older attempt (appended after the next one's) changes nothing
                if step and not step.finished and event.attempt >= step.attempt:
                    step.status, step.attempt, step.started = STEP_STATUS_AFTER[StepStarted], event.attempt, event
            case StepAttemptFailed():
                step = self.steps.get(event.step_id)
                if step:
                    step.error = event.error
                    (step.lost_attempts if event.infrastructure else step.failed_attempts).add(event.attempt)
            case StepSucceeded() | StepFailed() | StepCancelled():
                step = self.steps.get(event.step_id)
                if step and not step.finished:
                    self.active -= 1
                    step.status = STEP_STATUS_AFTER[type(event)]
                    if isinstance(event, StepSucceeded):
                        step.outputs, step.error = event.outputs, None
                    elif isinstance(event, StepFailed):
                        step.error = event.error
                    else:
                        step.error = event.reason
            case RunTerminationRequested():
                self.termination = event
            case RunTerminated():
                self.terminated_final = True


def returned_outputs(events: Iterable[StoredEvent], step_id: str, attempt: int) -> dict[int, StepOutputReturned]:
    """The outputs a Kubernetes step attempt returned through the API so far, by index, the
    first of each index winning: what the returns route checks a re-upload against and what the
    executor collects when the Job succeeds."""
    out: dict[int, StepOutputReturned] = {}
    for stored in events:
        e = stored.event
        if isinstance(e, StepOutputReturned) and e.step_id == step_id and e.attempt == attempt:
            out.setdefault(e.index, e)
    return out


class RunStateCache:
    """Run folds kept between calls and caught up from the run's last folded sequence.

    The executor checks a run before starting and before finishing every step, and the API
    before every command; re-reading and re-folding a whole run each time made a run of N steps
    cost O(N²). The stream is append-only, so reading only what follows ``version`` is exact.
    Least recently used runs are dropped beyond ``size``."""

    def __init__(self, store: EventStore, size: int = 1024) -> None:
        self.store = store
        self.size = size
        self._runs: OrderedDict[str, tuple[RunState, asyncio.Lock]] = OrderedDict()

    async def get(self, run_id: str) -> RunState:
        entry = self._runs.get(run_id)
        if entry is None:
            entry = self._runs[run_id] = (RunState(run_id), asyncio.Lock())
            while len(self._runs) > self.size:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(run_id)
        state, lock = entry
        async with lock:  # one catch-up at a time per run; the next one starts where it ended
            for stored in await self.store.read(run_filter(run_id), state.version + 1):
                if stored.seq > state.version:
                    state.apply(stored.event, stored.seq)
        return state
