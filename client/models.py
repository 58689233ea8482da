"""The API's JSON shapes as the CLI reads them (``GET /api/run/{id}``, the history, the SSE
CloudEvents). Written here rather than imported from ``api/``: the client knows the service only by
its public contract, and every model ignores fields it does not know, so a newer service with more
fields still works with an older CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FINISHED_STEP = ("success", "failure", "cancelled")
FINAL_RUN = ("complete", "terminated")


class Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Step(Loose):
    id: str
    operator: str
    status: str
    revision: int = 0
    attempt: int = 0
    target: str | None = None
    error: str | None = None
    inputDataUnits: dict[str, str] = Field(default_factory=dict)
    outputDataUnits: list[str] = Field(default_factory=list)
    scheduledAt: datetime | None = None
    startedAt: datetime | None = None
    finishedAt: datetime | None = None

    @property
    def duration(self) -> float | None:
        if self.startedAt and self.finishedAt:
            return (self.finishedAt - self.startedAt).total_seconds()
        return None


class Unit(Loose):
    id: str
    dataKind: str
    filename: str = "data"
    size: int = 0
    sha256: str | None = None
    stepId: str | None = None
    ancestors: list[str] = Field(default_factory=list)


class StepCounts(Loose):
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    active: int = 0


class Run(Loose):
    id: str
    status: str
    steps: list[Step] = Field(default_factory=list)
    dataPool: list[Unit] = Field(default_factory=list)
    paramPool: dict[str, Any] = Field(default_factory=dict)
    stepCounts: StepCounts = Field(default_factory=StepCounts)
    maxParallel: int | None = None
    terminationReason: str | None = None
    createdAt: datetime | None = None
    updatedAt: datetime | None = None
    version: int = 0


class RunSummary(Loose):
    id: str
    status: str
    stepCounts: StepCounts = Field(default_factory=StepCounts)
    createdAt: datetime | None = None
    updatedAt: datetime | None = None


class HistoryEvent(Loose):
    sequence: int
    id: str
    type: str
    time: datetime
    actor: str
    data: dict[str, Any] = Field(default_factory=dict)


class HistoryPage(Loose):
    events: list[HistoryEvent]
    next: int | None = None


class CloudEvent(Loose):
    """One SSE message's ``data:`` (CloudEvents 1.0 structured, docs/EVENTS.md)."""

    id: str
    type: str  # dev.mlynar.<EventType>
    time: datetime | None = None
    subject: str | None = None
    sequence: str | None = None
    actor: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def event_type(self) -> str:
        return self.type.removeprefix("dev.mlynar.")


class Declared(Loose):
    """The answer of ``POST /api/data-kinds`` and ``/api/operators``."""

    name: str
    changed: bool
    revision: int | None = None
