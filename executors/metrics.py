"""The executor's metrics (``mlynar_steps_*``, ``mlynar_step_*``, ``mlynar_executor_running_steps``
of :mod:`mlynar_events.metrics`), counted from what the worker appends.

Counting at the append, and only when JetStream did not answer it as a duplicate, counts each
fact once: a redelivered step re-attached by another executor appends its ``StepStarted`` again
with the same id (a duplicate, so not a second start), and whichever executor appends the
outcome counts it. The labels are the step's operator and machine (``kubernetes`` for a Job),
known from the ``StepScheduled`` the worker is handling (:meth:`StepMetrics.track`).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from mlynar_events import metrics as m
from mlynar_events.events import (
    Event, StepAttemptFailed, StepCancelled, StepFailed, StepScheduled, StepStarted, StepSucceeded,
)

OUTCOME = {StepSucceeded: "success", StepFailed: "failure", StepCancelled: "cancelled"}
"""The ``outcome`` label of each final event (the step statuses of ``runstate.py``)."""


def cause(infrastructure: bool) -> str:
    return "infrastructure" if infrastructure else "operator"


class StepMetrics:
    """One per worker: the labels of the steps it handles, when each started here, and the source
    of :data:`mlynar_events.metrics.RUNNING_STEPS` (the worker's ``running`` attempts)."""

    def __init__(self, running: Mapping[str, Any]) -> None:
        self._running = running  # step_id -> Attempt, the worker's own dict
        self._labels: dict[str, tuple[str, str]] = {}  # step_id -> (operator, machine)
        self._started: dict[str, float] = {}  # step_id -> monotonic time of its first start here
        m.RUNNING_STEPS.add(self)

    def track(self, step: StepScheduled) -> None:
        self._labels[step.step_id] = (step.operator, m.machine_label(step.spec.machine))

    def forget(self, step_id: str) -> None:
        self._labels.pop(step_id, None)
        self._started.pop(step_id, None)

    def appended(self, event: Event, duplicate: bool) -> None:
        """After the worker appended ``event`` (``duplicate``: JetStream had it already)."""
        step_id = getattr(event, "step_id", None)
        labels = self._labels.get(step_id) if step_id else None
        if labels is None:
            return
        if isinstance(event, StepStarted):
            self._started.setdefault(event.step_id, time.monotonic())  # a re-attach starts the clock too
            if duplicate:
                return
            m.STEP_ATTEMPTS.labels(*labels).inc()
            if event.attempt == 1:
                m.STEPS_STARTED.labels(*labels).inc()
            return
        if duplicate:
            return
        match event:
            case StepAttemptFailed():
                m.STEP_ATTEMPT_FAILURES.labels(*labels, cause(event.infrastructure)).inc()
                m.STEP_RETRIES.labels(*labels, cause(event.infrastructure)).inc()
            case StepSucceeded() | StepFailed() | StepCancelled():
                outcome = OUTCOME[type(event)]
                m.STEPS_FINISHED.labels(*labels, outcome).inc()
                if isinstance(event, StepFailed) and event.step_id in self._started:  # an attempt ran
                    m.STEP_ATTEMPT_FAILURES.labels(*labels, cause(event.infrastructure)).inc()
                started = self._started.get(event.step_id)
                if started is not None:
                    m.STEP_DURATION.labels(*labels, outcome).observe(time.monotonic() - started)

    def running_by_machine(self) -> m.Samples:
        counts: dict[str, int] = {}
        for attempt in list(self._running.values()):
            machine = m.machine_label(attempt.step.spec.machine)
            counts[machine] = counts.get(machine, 0) + 1
        return [((machine,), float(n)) for machine, n in counts.items()]
