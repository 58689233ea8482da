"""What the step worker asks of a place that runs steps (a registered machine, Kubernetes).

A backend runs one attempt of a step to the end and hands back the outputs as local files; the
worker owns everything else (events, retries, blobs). ``external_id`` is stable per attempt, so
running an attempt again after a crash re-attaches to it instead of starting it twice."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mlynar_events.events import StepScheduled


@dataclass
class Attempt:
    step: StepScheduled
    attempt: int
    external_id: str
    workdir: Path  # private scratch space of this attempt on the executor's disk
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


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


class BackendError(Exception):
    """The backend could not run the attempt (unreachable, forbidden, misconfigured)."""


class Backend(Protocol):
    def target(self, step: StepScheduled) -> str: ...
    def external_id(self, step: StepScheduled, attempt: int) -> str: ...
    async def run(self, attempt: Attempt) -> AttemptResult: ...
    async def close(self) -> None: ...
