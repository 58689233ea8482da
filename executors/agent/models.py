"""Wire models of the machine-agent protocol (``/v1``): the step manifest a client PUTs, the
operator's output manifest (``mlynar-out.json``) and the step status the agent serves.

These are shared by the agent (:mod:`executors.agent`) and the executor's client
(:mod:`executors.machine_client`)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The operator's output manifest lives with its one validator (shared with the Kubernetes wrapper).
from mlynar_events.outputs import ManifestEntry as OperatorOutput  # noqa: F401
from mlynar_events.outputs import OutputManifest as OperatorOutputManifest  # noqa: F401

STEP_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INPUT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

StepStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

#: Variables the agent always sets itself; a manifest may override HOME/LANG but never this (nor
#: PATH and the loader variables, which the command policy refuses: executors/agent/allow.py).
RESERVED_ENV = frozenset({"MLYNAR_OUTPUT_DIR"})


def valid_step_id(step_id: str) -> bool:
    return bool(STEP_ID_RE.fullmatch(step_id))


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    return value


def sanitize_filename(filename: str) -> str:
    """Reduce a client-supplied file name to its last path component (``/`` and ``\\`` both count
    as separators); ``""``, ``.`` and ``..`` are rejected."""
    _no_nul(filename, "filename")
    base = PurePosixPath(filename.replace("\\", "/")).name
    if base in {"", ".", ".."}:
        raise ValueError(f"filename {filename!r} has no usable base name")
    return base


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="multipart field name of the file part; also its directory name")
    filename: str | None = Field(default=None, description="file name on disk (basename only); default: name")
    env: str = Field(description="environment variable that receives the input file's absolute path")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not INPUT_NAME_RE.fullmatch(v) or v in {".", ".."} or len(v) > 128:
            raise ValueError(
                f"input name {v!r} must match {INPUT_NAME_RE.pattern}, be at most 128 characters "
                "and not be '.' or '..'"
            )
        return v

    @field_validator("filename")
    @classmethod
    def _filename(cls, v: str | None) -> str | None:
        if v is None:
            return None
        base = sanitize_filename(v)
        if len(base.encode()) > 255:
            raise ValueError("filename is longer than 255 bytes")
        return base

    @field_validator("env")
    @classmethod
    def _env(cls, v: str) -> str:
        if not ENV_NAME_RE.fullmatch(v):
            raise ValueError(f"input env {v!r} is not a valid environment variable name")
        if v in RESERVED_ENV:
            raise ValueError(f"input env {v!r} is reserved by the agent")
        return v

    @model_validator(mode="after")
    def _default_filename(self) -> "InputSpec":
        if self.filename is None:
            self.filename = self.name
        return self


class StepManifest(BaseModel):
    """The ``manifest`` part of ``PUT /v1/steps/{step_id}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    command: list[str] = Field(min_length=1, description="argv of the step; no shell is involved")
    env: dict[str, str] = Field(default_factory=dict)
    inputs: list[InputSpec] = Field(default_factory=list)
    timeout_seconds: int | None = Field(default=None, alias="timeoutSeconds", gt=0)

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        if not v[0]:
            raise ValueError("command[0] (the program) must not be empty")
        for arg in v:
            _no_nul(arg, "command arguments")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_NAME_RE.fullmatch(key):
                raise ValueError(f"env key {key!r} is not a valid environment variable name")
            if key in RESERVED_ENV:
                raise ValueError(f"env key {key!r} is reserved by the agent")
            _no_nul(value, f"env value of {key}")
        return v

    @model_validator(mode="after")
    def _unique_inputs(self) -> "StepManifest":
        names = [i.name for i in self.inputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate input names {dup}")
        envs = [i.env for i in self.inputs]
        dup = sorted({e for e in envs if envs.count(e) > 1})
        if dup:
            raise ValueError(f"duplicate input env names {dup}")
        return self

    def canonical(self) -> dict:
        """The normalised form compared by the idempotent PUT."""
        return self.model_dump(mode="json", by_alias=True)


class StepOutput(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    index: int
    data_kind: str = Field(alias="dataKind")
    file: str
    size: int
    sha256: str


class StepStatus(BaseModel):
    """What ``GET /v1/steps/{step_id}`` answers (and what ``state.json`` holds)."""

    model_config = ConfigDict(populate_by_name=True)

    id: str
    state: StepStateName = "queued"
    exit_code: int | None = Field(default=None, alias="exitCode")
    error: str | None = None
    retryable: bool = Field(
        default=True,
        description="false when running the same step again would fail the same way "
        "(e.g. the command is refused by --allow); meaningful for failed steps",
    )
    lost: bool = Field(
        default=False,
        description="true when the attempt ended because of the agent, not the operator (the agent "
        "restarted or stopped while the step was queued or running): the executor retries it "
        "without using the operator's retries budget",
    )
    outputs: list[StepOutput] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc), alias="createdAt")
    started_at: datetime | None = Field(default=None, alias="startedAt")
    finished_at: datetime | None = Field(default=None, alias="finishedAt")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def public(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)
