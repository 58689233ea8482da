"""Every fact of the system as an explicit event class inside one envelope.

The envelope is ``{id, type, schema, time, actor, data}``; ``schema`` is the version of ``data``'s
shape for that type. Old shapes are brought up to date on read by the functions registered with
:func:`upcaster` (eventsourcing-style upcasting), so handlers only ever see the current class.

Subjects are ``mlynar.<aggregate>.<key>.<Type>``; the JetStream stream sequence is the global
position of an event.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .specs import DataKindSpec, OperatorSpec

STREAM = "MLYNAR"
SUBJECT_PREFIX = "mlynar"


class Event(BaseModel):
    """Base of all event payloads."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    aggregate: ClassVar[str]
    schema_version: ClassVar[int] = 1

    def key(self) -> str:
        raise NotImplementedError

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def subject(self) -> str:
        return f"{SUBJECT_PREFIX}.{self.aggregate}.{self.key()}.{self.type_name()}"


class RunEvent(Event):
    aggregate: ClassVar[str] = "run"
    run_id: str

    def key(self) -> str:
        return self.run_id


class NamedEvent(Event):
    name: str

    def key(self) -> str:
        return self.name


# ---- registry ---------------------------------------------------------------------------------


class DataKindDeclared(NamedEvent):
    aggregate: ClassVar[str] = "datakind"
    spec: DataKindSpec


class DataKindDeleted(NamedEvent):
    aggregate: ClassVar[str] = "datakind"


class OperatorDeclared(NamedEvent):
    aggregate: ClassVar[str] = "operator"
    spec: OperatorSpec
    revision: int


class OperatorDeleted(NamedEvent):
    aggregate: ClassVar[str] = "operator"


# ---- machines (the token is never here: only a reference into the secret store) ---------------


class MachineRegistered(NamedEvent):
    aggregate: ClassVar[str] = "machine"
    url: str
    labels: dict[str, str] = Field(default_factory=dict)
    token_ref: str | None = None


class MachineUpdated(MachineRegistered):
    pass


class MachineDeleted(NamedEvent):
    aggregate: ClassVar[str] = "machine"


# ---- runs -------------------------------------------------------------------------------------


class RunCreated(RunEvent):
    pass


class DataUnitAdded(RunEvent):
    unit_id: str
    data_kind: str
    ancestors: list[str] = Field(default_factory=list)
    blob: str
    size: int
    sha256: str
    filename: str = "data"
    step_id: str | None = None
    output_index: int | None = None


class RunStarted(RunEvent):
    param_pool: dict[str, dict[str, str]] = Field(default_factory=dict)
    max_parallel: int = 8


class StepInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    env: str
    unit_id: str
    data_kind: str
    blob: str
    filename: str


class StepScheduled(RunEvent):
    step_id: str
    operator: str
    revision: int
    spec: OperatorSpec
    inputs: list[StepInput]
    env: dict[str, str]
    ancestors: list[str]


class StepStarted(RunEvent):
    step_id: str
    attempt: int
    executor: str
    target: str  # "machine:<name>" or "kubernetes:<namespace>"
    external_id: str  # the agent's step id or the Job name: what a re-attach looks for


class StepOutputReturned(RunEvent):
    """A Kubernetes step's wrapper returned output ``index`` of ``attempt`` to the API; the bytes
    are in ``blob``. The executor turns these into ``DataUnitAdded`` when the Job succeeds."""

    step_id: str
    attempt: int
    index: int
    data_kind: str
    blob: str
    size: int
    sha256: str
    filename: str = "data"


class StepAttemptFailed(RunEvent):
    step_id: str
    attempt: int
    error: str
    logs_blob: str | None = None
    retry_in: float


class StepSucceeded(RunEvent):
    step_id: str
    attempt: int
    outputs: list[str]
    logs_blob: str | None = None


class StepFailed(RunEvent):
    step_id: str
    attempt: int
    error: str
    logs_blob: str | None = None


class StepCancelled(RunEvent):
    step_id: str
    reason: str
    attempt: int | None = None  # None: cancelled before an attempt started
    logs_blob: str | None = None


class RunTerminationRequested(RunEvent):
    cancel: bool = False
    reason: str = "requested by user"


class RunTerminated(RunEvent):
    reason: str


class RunCompleted(RunEvent):
    pass


class RunDeleted(RunEvent):
    pass


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        DataKindDeclared, DataKindDeleted, OperatorDeclared, OperatorDeleted,
        MachineRegistered, MachineUpdated, MachineDeleted,
        RunCreated, DataUnitAdded, RunStarted, StepScheduled, StepStarted, StepOutputReturned, StepAttemptFailed,
        StepSucceeded, StepFailed, StepCancelled, RunTerminationRequested, RunTerminated,
        RunCompleted, RunDeleted,
    )
}
STEP_OUTCOMES = (StepSucceeded, StepFailed, StepCancelled)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function turning ``data`` of ``event_type`` at ``from_version`` into
    ``from_version + 1``. Chains run in order until the class's current ``schema_version``."""

    def register(fn: Upcaster) -> Upcaster:
        UPCASTERS[(event_type, from_version)] = fn
        return fn

    return register


class Envelope(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    type: str
    schema_: int = Field(alias="schema")
    time: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    actor: str = "system"
    data: dict[str, Any]

    @classmethod
    def wrap(cls, event: Event, actor: str, event_id: str | None = None) -> "Envelope":
        return cls(
            id=event_id or str(uuid.uuid4()),
            type=event.type_name(),
            schema=event.schema_version,
            actor=actor,
            data=event.model_dump(mode="json"),
        )

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    def event(self) -> Event:
        cls = EVENT_TYPES.get(self.type)
        if cls is None:
            raise UnknownEventType(self.type)
        data, version = self.data, self.schema_
        while version < cls.schema_version:
            data = UPCASTERS[(self.type, version)](data)
            version += 1
        return cls.model_validate(data)


class UnknownEventType(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back: its global position, subject and envelope. A plain dataclass:
    its parts are validated already, and it is built for every event every consumer reads."""

    seq: int
    subject: str
    envelope: Envelope
    event: Event

    @property
    def time(self) -> datetime:
        return self.envelope.time


AggregateName = Literal["run", "datakind", "operator", "machine"]
