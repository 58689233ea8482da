"""Every fact of the system as an explicit event class inside one envelope.

The envelope is ``{id, type, schema, time, actor, data}``; ``schema`` is the version of ``data``'s
shape for that type. Old shapes are brought up to date on read by the class's own
``upcast_v<N>_v<N+1>`` methods (eventsourcing-style upcasting), so handlers only ever see the
current class.

**The catalogue is the classes.** Every concrete event class names its stable ``event_type`` (what
is stored in the envelope and the subject, so renaming the Python class never orphans history)
and registers itself on definition in :data:`CATALOGUE`; a class that forgets it, or reuses a
name, fails at import. Subjects are ``mlynar.<aggregate>.<key>.<event_type>``; the JetStream
stream sequence is the global position of an event. Roles declare what they consume as a tuple
of classes and derive their subject filters with :func:`subject_filters`. Who produces and who
consumes each event: ``docs/ARCHITECTURE.md`` (checked against this module by a test).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from .specs import DataKindSpec, OperatorSpec

STREAM = "MLYNAR"
SUBJECT_PREFIX = "mlynar"


CATALOGUE: dict[str, type["Event"]] = {}
"""``event_type`` -> class, filled by the classes themselves as they are defined."""


class Event(BaseModel):
    """Base of all event payloads.

    A concrete subclass sets ``event_type`` (stable, stored) and, when its shape changes, bumps
    ``schema_version`` and adds ``upcast_v<N>_v<N+1>(data) -> data`` static methods for every
    older version. Intermediate bases set ``abstract = True`` and are not registered."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    aggregate: ClassVar[str]
    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    abstract: ClassVar[bool] = True

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "event_type" not in cls.__dict__:
            if not cls.__dict__.get("abstract", False):
                raise TypeError(f"event class {cls.__name__} must set event_type (or abstract = True)")
            return
        name = cls.event_type
        if name in CATALOGUE and CATALOGUE[name].__qualname__ != cls.__qualname__:
            raise TypeError(f"event_type {name!r} of {cls.__name__} is already {CATALOGUE[name].__name__}'s")
        missing = [v for v in range(1, cls.schema_version) if not hasattr(cls, f"upcast_v{v}_v{v + 1}")]
        if missing:
            raise TypeError(f"{cls.__name__} is at schema {cls.schema_version} but has no "
                            + ", ".join(f"upcast_v{v}_v{v + 1}" for v in missing))
        CATALOGUE[name] = cls

    @classmethod
    def upcast(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """``data`` stored at schema ``version``, brought to the current ``schema_version``."""
        while version < cls.schema_version:
            data = getattr(cls, f"upcast_v{version}_v{version + 1}")(data)
            version += 1
        return data

    def key(self) -> str:
        raise NotImplementedError

    def subject(self) -> str:
        return f"{SUBJECT_PREFIX}.{self.aggregate}.{self.key()}.{self.event_type}"


class RunEvent(Event):
    abstract: ClassVar[bool] = True
    aggregate: ClassVar[str] = "run"
    run_id: str

    def key(self) -> str:
        return self.run_id


class NamedEvent(Event):
    abstract: ClassVar[bool] = True
    name: str

    def key(self) -> str:
        return self.name


# ---- registry ---------------------------------------------------------------------------------


class DataKindDeclared(NamedEvent):
    event_type: ClassVar[str] = "DataKindDeclared"
    aggregate: ClassVar[str] = "datakind"
    spec: DataKindSpec


class DataKindDeleted(NamedEvent):
    event_type: ClassVar[str] = "DataKindDeleted"
    aggregate: ClassVar[str] = "datakind"


class OperatorDeclared(NamedEvent):
    event_type: ClassVar[str] = "OperatorDeclared"
    aggregate: ClassVar[str] = "operator"
    spec: OperatorSpec
    revision: int


class OperatorDeleted(NamedEvent):
    event_type: ClassVar[str] = "OperatorDeleted"
    aggregate: ClassVar[str] = "operator"


# ---- machines (the token is never here: only a reference into the secret store) ---------------


class MachineRegistered(NamedEvent):
    """``owner``: the principal that registered it (``None``: before principals existed, or the
    built-in ``local``); ``shared_with``: principals whose runs may use it besides the owner's
    (``"*"``: everyone). The rule is :func:`mlynar_events.principals.may_use_machine`."""

    event_type: ClassVar[str] = "MachineRegistered"
    aggregate: ClassVar[str] = "machine"
    url: str
    labels: dict[str, str] = Field(default_factory=dict)
    token_ref: str | None = None
    owner: str | None = None
    shared_with: list[str] = Field(default_factory=list)


class MachineUpdated(MachineRegistered):
    event_type: ClassVar[str] = "MachineUpdated"


class MachineDeleted(NamedEvent):
    event_type: ClassVar[str] = "MachineDeleted"
    aggregate: ClassVar[str] = "machine"


# ---- runs -------------------------------------------------------------------------------------


class RunCreated(RunEvent):
    """``owner``: the principal the run belongs to (``None``: created before principals existed)."""

    event_type: ClassVar[str] = "RunCreated"
    owner: str | None = None


class DataUnitAdded(RunEvent):
    event_type: ClassVar[str] = "DataUnitAdded"
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
    event_type: ClassVar[str] = "RunStarted"
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
    event_type: ClassVar[str] = "StepScheduled"
    step_id: str
    operator: str
    revision: int
    spec: OperatorSpec
    inputs: list[StepInput]
    env: dict[str, str]
    ancestors: list[str]
    owner: str | None = None  # the run's owner: whose machines the step may use


class StepStarted(RunEvent):
    event_type: ClassVar[str] = "StepStarted"
    step_id: str
    attempt: int
    executor: str
    target: str  # "machine:<name>" or "kubernetes:<namespace>"
    external_id: str  # the agent's step id or the Job name: what a re-attach looks for


class StepOutputReturned(RunEvent):
    """A Kubernetes step's wrapper returned output ``index`` of ``attempt`` to the API; the bytes
    are in ``blob``. The executor turns these into ``DataUnitAdded`` when the Job succeeds."""

    event_type: ClassVar[str] = "StepOutputReturned"
    step_id: str
    attempt: int
    index: int
    data_kind: str
    blob: str
    size: int
    sha256: str
    filename: str = "data"


class StepAttemptFailed(RunEvent):
    """Attempt ``attempt`` ended without success and another one follows in ``retry_in`` s.
    ``infrastructure``: it was lost to the infrastructure (agent restarted or unreachable, blob
    store unavailable), not failed by the operator; such attempts do not use ``spec.retries``."""

    event_type: ClassVar[str] = "StepAttemptFailed"
    step_id: str
    attempt: int
    error: str
    logs_blob: str | None = None
    retry_in: float
    infrastructure: bool = False


class StepSucceeded(RunEvent):
    event_type: ClassVar[str] = "StepSucceeded"
    step_id: str
    attempt: int
    outputs: list[str]
    logs_blob: str | None = None


class StepFailed(RunEvent):
    """The step's last attempt failed. ``infrastructure``: it ended because the executor's cap
    on attempts lost to the infrastructure was reached, not because the operator failed."""

    event_type: ClassVar[str] = "StepFailed"
    step_id: str
    attempt: int
    error: str
    logs_blob: str | None = None
    infrastructure: bool = False


class StepCancelled(RunEvent):
    event_type: ClassVar[str] = "StepCancelled"
    step_id: str
    reason: str
    attempt: int | None = None  # None: cancelled before an attempt started
    logs_blob: str | None = None


class RunTerminationRequested(RunEvent):
    event_type: ClassVar[str] = "RunTerminationRequested"
    cancel: bool = False
    reason: str = "requested by user"


class RunTerminated(RunEvent):
    event_type: ClassVar[str] = "RunTerminated"
    reason: str


class RunCompleted(RunEvent):
    event_type: ClassVar[str] = "RunCompleted"


class RunDeleted(RunEvent):
    event_type: ClassVar[str] = "RunDeleted"


# ---- webhooks (the signing secret is never here: only a reference into the secret store) ------


class WebhookEvent(Event):
    abstract: ClassVar[bool] = True
    aggregate: ClassVar[str] = "webhook"
    webhook_id: str

    def key(self) -> str:
        return self.webhook_id


class WebhookCreated(WebhookEvent):
    """A subscription: every later event matching ``types``/``runs`` (empty = any) is POSTed to
    ``url``. Delivery starts right after this event's own sequence."""

    event_type: ClassVar[str] = "WebhookCreated"
    url: str
    types: list[str] = Field(default_factory=list)
    runs: list[str] = Field(default_factory=list)
    description: str = ""
    secret_ref: str
    owner: str | None = None
    """The principal that created it (``None``: before principals existed)."""
    owner_role: Literal["admin", "member"] | None = None
    """A member's webhook receives only what the member may see (its own runs' events, none of
    tokens or webhooks: :func:`mlynar_events.principals.may_see`); an admin's, everything."""


class WebhookSecretRotated(WebhookEvent):
    """``secret_ref`` signs from now on; ``previous_ref`` signs too until ``grace_until``."""

    event_type: ClassVar[str] = "WebhookSecretRotated"
    secret_ref: str
    previous_ref: str
    grace_until: datetime


class WebhookDisabled(WebhookEvent):
    """Delivery failed ``failures`` times in a row at event ``event_id`` (stream sequence
    ``sequence``) and stopped there until a ``WebhookEnabled``."""

    event_type: ClassVar[str] = "WebhookDisabled"
    failures: int
    error: str
    event_id: str
    sequence: int


class WebhookEnabled(WebhookEvent):
    event_type: ClassVar[str] = "WebhookEnabled"


class WebhookDeleted(WebhookEvent):
    event_type: ClassVar[str] = "WebhookDeleted"


# ---- API tokens (the token is never here: only its SHA-256) ----------------------------------


class TokenEvent(Event):
    abstract: ClassVar[bool] = True
    aggregate: ClassVar[str] = "token"
    token_id: str

    def key(self) -> str:
        return self.token_id


class TokenCreated(TokenEvent):
    """An API token for ``principal`` with ``role``; ``digest`` is the token's SHA-256
    (:func:`mlynar_events.principals.token_digest`)."""

    event_type: ClassVar[str] = "TokenCreated"
    principal: str
    role: Literal["admin", "member", "viewer"]
    digest: str
    description: str = ""


class TokenRevoked(TokenEvent):
    event_type: ClassVar[str] = "TokenRevoked"


STEP_OUTCOMES = (StepSucceeded, StepFailed, StepCancelled)


def of_aggregate(aggregate: str) -> tuple[type[Event], ...]:
    """Every event class of one aggregate (``run``, ``datakind``, ``operator``, ``machine``, ``webhook``, ``token``)."""
    return tuple(cls for cls in CATALOGUE.values() if cls.aggregate == aggregate)


def subject_filters(consumes: Iterable[type[Event]]) -> list[str]:
    """The JetStream subject filters that deliver exactly the events of ``consumes``: one
    ``mlynar.<aggregate>.>`` when a role takes every event of an aggregate, else one
    ``mlynar.<aggregate>.*.<event_type>`` per class. Roles derive their filters from their
    declared ``CONSUMES`` with this, never by writing subjects by hand."""
    consumes = tuple(consumes)
    if set(consumes) >= set(CATALOGUE.values()):
        return [f"{SUBJECT_PREFIX}.>"]
    wanted: dict[str, set[str]] = {}
    for cls in consumes:
        wanted.setdefault(cls.aggregate, set()).add(cls.event_type)
    filters: list[str] = []
    for aggregate in sorted(wanted):
        every = {cls.event_type for cls in of_aggregate(aggregate)}
        if wanted[aggregate] >= every:
            filters.append(f"{SUBJECT_PREFIX}.{aggregate}.>")
        else:
            filters.extend(f"{SUBJECT_PREFIX}.{aggregate}.*.{t}" for t in sorted(wanted[aggregate]))
    return filters


def key_filter(aggregate: str, key: str) -> str:
    """Every event of one aggregate instance: ``mlynar.run.<id>.>``, ``mlynar.machine.local.>``."""
    return f"{SUBJECT_PREFIX}.{aggregate}.{key}.>"


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
            type=event.event_type,
            schema=event.schema_version,
            actor=actor,
            data=event.model_dump(mode="json"),
        )

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    def event(self) -> Event:
        cls = CATALOGUE.get(self.type)
        if cls is None:
            raise UnknownEventType(self.type)
        return cls.model_validate(cls.upcast(self.data, self.schema_))


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


AggregateName = Literal["run", "datakind", "operator", "machine", "webhook", "token"]
