"""Request and response bodies of the REST API (Mlynar's JSON shapes, extra fields allowed).
The OpenAPI document is generated from these models."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from mlynar_events.names import NAME_JSON_SCHEMA, check_dns1123_label
from mlynar_events.runs import ParamIn

from .hosts import parse_host

Name = Annotated[str, AfterValidator(check_dns1123_label), WithJsonSchema(NAME_JSON_SCHEMA)]


_AGENT_URL = re.compile(r"^(?P<scheme>https?)://(?P<netloc>[^/?#@\\\s]+)(?P<path>/[A-Za-z0-9._~!$&'()*+,;=:%/-]*)?$")


def check_agent_url(v: str) -> str:
    """The one rule for a machine's URL: ``http(s)://host[:port][/path]`` and nothing else.

    No query or fragment (a URL ending in ``?x=`` or ``#`` would swallow the ``/v1/...`` paths
    the executor appends and aim them elsewhere), no user info, no whitespace or backslashes.
    Answers the URL without a trailing slash, so ``{url}/v1/healthz`` is always a sub-path."""
    m = _AGENT_URL.fullmatch(v) if len(v) <= 2048 else None
    if m is None or parse_host(m["netloc"]) is None:
        raise ValueError("url must be http(s)://host[:port][/path], without query, fragment or credentials")
    return v.rstrip("/")


AGENT_URL_SCHEMA = {
    "type": "string", "maxLength": 2048,
    # what check_agent_url accepts, less IPv6 literals and ports above 59999 (a pattern cannot check those)
    "pattern": r"^https?://[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:([1-9][0-9]{0,3}|[1-5][0-9]{4}))?"
               r"(/[A-Za-z0-9._~!$&'()*+,;=:%/-]*)?$",
}
AgentUrl = Annotated[str, AfterValidator(check_agent_url), WithJsonSchema(AGENT_URL_SCHEMA)]


class Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class ErrorBody(Model):
    error: str
    detail: Any = None
    statusCode: int | None = Field(None, description="the HTTP status again (the original Mlynar's NestJS field)")
    message: str | None = Field(None, description="the same as error (the original Mlynar's NestJS field)")


class DataUnitOut(Model):
    id: str
    dataKind: str
    ancestors: list[str]
    url: str
    size: int
    sha256: str
    filename: str
    stepId: str | None = None


class StepOut(Model):
    id: str
    jobName: str
    pvcName: str
    operator: str
    status: str
    inputDataUnits: dict[str, str]
    outputDataUnits: list[str]
    revision: int
    attempt: int
    target: str | None = None
    error: str | None = None
    logsUrl: str
    scheduledAt: str
    startedAt: str | None = None
    finishedAt: str | None = None


class ParamOut(Model):
    name: str
    defaultValue: str
    value: str | None = None


class StepCounts(Model):
    total: int
    succeeded: int
    failed: int
    cancelled: int
    active: int


class RunOut(Model):
    id: str
    id_: str = Field(alias="_id", description="the same as id (the original Mlynar's CouchDB field)")
    rev: str = Field(alias="_rev", description="changes whenever the run does (its version, as text)")
    status: str
    steps: list[StepOut]
    dataPool: list[DataUnitOut]
    paramPool: dict[str, list[ParamOut]]
    stepCounts: StepCounts
    owner: str | None = Field(None, description="the principal it belongs to (null: created before principals)")
    maxParallel: int | None = None
    terminationReason: str | None = None
    createdAt: str
    updatedAt: str
    startTime: str | None = Field(None, description="when the run was started (POST /run)")
    endTime: str | None = Field(None, description="when it became complete or terminated")
    durationMs: int | None = Field(None, description="endTime - startTime")
    version: int


class RunSummary(Model):
    id: str
    status: str
    owner: str | None = None
    stepCounts: StepCounts
    createdAt: str
    updatedAt: str


SharedWith = Annotated[list[Annotated[str, Field(pattern=r"^(\*|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)$")]],
                       Field(max_length=1000, description='principals whose runs may use it besides its owner ("*": everyone)')]


class MachineIn(Model):
    model_config = ConfigDict(extra="forbid")
    name: Name
    url: AgentUrl
    token: str | None = Field(default=None, min_length=1, max_length=4096)
    labels: dict[str, str] = Field(default_factory=dict)
    sharedWith: SharedWith = Field(default_factory=list)


class MachineUpdate(Model):
    model_config = ConfigDict(extra="forbid")
    url: AgentUrl | None = None
    token: str | None = Field(default=None, min_length=1, max_length=4096)
    labels: dict[str, str] | None = None
    sharedWith: SharedWith | None = None


class MachineOut(Model):
    name: str
    url: str
    labels: dict[str, str]
    hasToken: bool
    registeredAt: str
    updatedAt: str
    owner: str | None = Field(None, description="who registered it (null: the built-in machine, or before principals)")
    sharedWith: list[str] = Field(default_factory=list)


class MachineCheck(Model):
    """The outcome of calling a machine agent's health endpoint. Never the agent's body: the
    URL may point anywhere, and an answer echoed back would make the API a proxy into the
    network it can reach."""

    name: str
    ok: bool
    status: int | None = None
    latencyMs: float | None = None
    detail: str


class DataKindOut(Model):
    """The original Mlynar's list entry (``name``, ``displayName``) and the whole document."""

    name: str
    displayName: str | None = None
    apiVersion: str = "mlynar.dev/v1alpha1"
    kind: str = "DataKind"
    metadata: dict[str, Any]
    spec: dict[str, Any]


class OperatorOut(Model):
    """The original Mlynar's list entry (``name`` and the spec's fields at the top level) and
    the whole document."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    name: str
    apiVersion: str = "mlynar.dev/v1alpha1"
    kind: str = "Operator"
    metadata: dict[str, Any]
    spec: dict[str, Any]
    revision: int


class Declared(Model):
    name: str
    changed: bool
    revision: int | None = None


class Deleted(Model):
    deleted: bool = True


class Health(Model):
    """``/healthz``: ``ok`` (200) while this process is connected to NATS, ``unavailable`` (503)
    while it is not (its commands would time out); the projector's ``lag`` behind the stream's
    ``head`` is reported, not judged: a projector catching up after a restart is healthy."""

    status: str
    position: int
    nats: str = Field(description="connected or disconnected")
    head: int | None = Field(None, description="the stream's last sequence (null when NATS is unreachable)")
    lag: int | None = Field(None, description="events the projection is behind the head")


ParamPool = dict[str, list[ParamIn] | dict[str, str | int | float | bool | None]]
"""``POST /api/run/{id}/run``: per operator, Mlynar's ``[{name, value, defaultValue}]`` (what
``/params`` answers, with values) or ``{name: value}``. Operators and parameters must exist."""


class RunDeletedOut(Model):
    id: str
    deleted: bool = True


class AttemptOut(Model):
    """One finished attempt of a step."""

    step_id: str
    attempt: int
    outcome: str
    error: str | None = None
    logs_blob: str | None = None
    at: str


class StepWithAttempts(StepOut):
    attempts: list[AttemptOut]


class ReturnedOutput(Model):
    """A Kubernetes step's returned output, as recorded."""

    index: int
    dataKind: str
    size: int
    sha256: str
    filename: str
