"""What the step worker asks of a place that runs steps (a registered machine, Kubernetes).

A backend runs one attempt of a step to the end and hands back the outputs as local files; the
worker owns everything else (events, retries, blobs). ``external_id`` is stable per attempt, so
running an attempt again after a crash re-attaches to it instead of starting it twice.

**Release after the outcome is durable.** An attempt's trace where it ran (the agent's step with
its outputs, the Job with its PVC) is what a redelivered step re-attaches to, so ``run`` never
removes it when the attempt ends: the worker calls ``release`` only once the attempt's outcome
events (outputs, success, failure) are appended. Anything going wrong in between (a NATS outage,
a full blob disk, the executor killed) leaves the attempt where it is, finished, to be collected
again, never run again. Cancelling is the one exception: killing the attempt is its removal.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from mlynar_events.events import StepScheduled


class AttemptSuperseded(Exception):
    """Raised by a backend that found nothing to attach to and was told by
    :meth:`Attempt.check_open` that the attempt's end is recorded already: another executor
    (a redelivery) finished and released it. Creating it now would run the operator again."""


async def _always_open() -> bool:
    return True


@dataclass
class Attempt:
    step: StepScheduled
    attempt: int
    external_id: str
    workdir: Path  # private scratch space of this attempt on the executor's disk
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    is_open: Callable[[], Awaitable[bool]] = field(default=_always_open, repr=False)
    """A fresh read of the run: neither the step's outcome nor this attempt's end is recorded."""

    async def check_open(self) -> None:
        """Called by a backend right before it creates the attempt where it runs (agent PUT, Job),
        having found nothing there to attach to. Nothing is there either when another executor
        holding the same step (a redelivery while it lived) appended the outcome and released
        the attempt after this executor read the run: a release only follows a recorded
        outcome, so reading the run after finding nothing tells the two apart."""
        if not await self.is_open():
            raise AttemptSuperseded(f"attempt {self.attempt} of step {self.step.step_id} ended elsewhere")


@dataclass
class Output:
    data_kind: str
    path: Path
    filename: str


@dataclass
class AttemptResult:
    ok: bool
    outputs: list[Output] = field(default_factory=list)
    error: str | None = None
    logs: Path | None = None
    retryable: bool = True  # False: a retry would fail the same way (e.g. command not allowed)
    cancelled: bool = False
    lost: bool = False
    """The attempt ended because of the infrastructure, not the operator: the agent restarted or
    could not be reached, the blob store could not be read or written, the Kubernetes API failed.
    Retried up to the executor's own cap without using the operator's ``retries``."""
    superseded: bool = False
    """Nothing was created: the attempt ended elsewhere (:class:`AttemptSuperseded`); the worker
    decides again from the run's recorded state."""


class BackendError(Exception):
    """The backend could not run the attempt (unreachable, forbidden, misconfigured)."""


class Backend(Protocol):
    def target(self, step: StepScheduled) -> str: ...
    def external_id(self, step: StepScheduled, attempt: int) -> str: ...
    async def run(self, attempt: Attempt) -> AttemptResult: ...

    async def release(self, attempt: Attempt, *, failed: bool) -> None:
        """Remove what the attempt left where it ran; called only after its outcome is appended
        (see the module). Idempotent: an attempt already released is fine; a failure to release
        is logged, never raised (the outcome stands)."""
        ...

    async def close(self) -> None: ...
