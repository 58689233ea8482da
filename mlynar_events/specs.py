"""DataKind and Operator specs, accepted exactly as Mlynar's CRD documents are written
(``apiVersion: mlynar.dev/v1alpha1``) plus our extensions (``machine``, ``command``,
``timeoutSeconds``, ``retries``, ``resources``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Iterable

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .names import check_dns1123_label

Name = Annotated[str, AfterValidator(check_dns1123_label)]
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
API_VERSION = "mlynar.dev/v1alpha1"


def _env_name(name: str) -> str:
    if not ENV_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid environment variable name")
    if name == "MLYNAR_OUTPUT_DIR":
        raise ValueError("MLYNAR_OUTPUT_DIR is set by the runner and cannot be declared")
    return name


EnvName = Annotated[str, AfterValidator(_env_name)]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DataKindSpec(Spec):
    displayName: str = ""


class OperatorInput(Spec):
    fileLocationEnv: EnvName
    dataKind: Name


class ConfigurableEnv(Spec):
    name: EnvName
    defaultValue: str = ""


class ConstantEnv(Spec):
    name: EnvName
    value: str = ""


class Resources(Spec):
    requests: dict[str, str | int] = Field(default_factory=dict)
    limits: dict[str, str | int] = Field(default_factory=dict)


class OperatorSpec(Spec):
    image: str | None = None
    args: list[str] = Field(default_factory=list)
    inputs: list[OperatorInput] = Field(default_factory=list)
    possibleOutputKinds: list[Name] = Field(default_factory=list)
    configurableEnv: list[ConfigurableEnv] = Field(default_factory=list)
    constantEnv: list[ConstantEnv] = Field(default_factory=list)
    # extensions
    machine: Name | None = None
    command: list[str] = Field(default_factory=list)
    timeoutSeconds: int | None = Field(default=None, ge=1)
    retries: int = Field(default=0, ge=0, le=100)
    resources: Resources | None = None

    @model_validator(mode="after")
    def _check(self) -> "OperatorSpec":
        envs = [i.fileLocationEnv for i in self.inputs]
        dupes = sorted({e for e in envs if envs.count(e) > 1})
        if dupes:
            raise ValueError(f"duplicate fileLocationEnv {dupes}")
        if self.machine is not None and not self.command:
            raise ValueError("an operator with spec.machine needs spec.command (argv)")
        if self.machine is None and not self.image:
            raise ValueError("an operator without spec.machine needs spec.image")
        return self

    def kinds(self) -> set[str]:
        return {i.dataKind for i in self.inputs} | set(self.possibleOutputKinds)


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Name


class DataKindDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    apiVersion: str = API_VERSION
    kind: str = "DataKind"
    metadata: Metadata
    spec: DataKindSpec = Field(default_factory=DataKindSpec)


class OperatorDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    apiVersion: str = API_VERSION
    kind: str = "Operator"
    metadata: Metadata
    spec: OperatorSpec


class SpecError(ValueError):
    """A document that is not a valid DataKind/Operator; ``detail`` is JSON-able."""

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.detail = detail


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False, include_context=False, include_input=False)]


def parse_document(doc: Any, expect: str | None = None) -> DataKindDocument | OperatorDocument:
    if not isinstance(doc, dict):
        raise SpecError("a document must be a mapping")
    kind = doc.get("kind", expect)
    if expect is not None and kind != expect:
        raise SpecError(f"expected kind {expect!r}, got {kind!r}")
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise SpecError(f"apiVersion must be {API_VERSION!r}")
    model = {"DataKind": DataKindDocument, "Operator": OperatorDocument}.get(kind)
    if model is None:
        raise SpecError(f"unknown kind {kind!r}: expected DataKind or Operator")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(f"invalid {kind}", validation_detail(exc)) from None


def load_documents(paths: Iterable[Path]) -> list[DataKindDocument | OperatorDocument]:
    """All DataKind/Operator documents from files and directories (``*.yaml``/``*.yml``, sorted)."""
    docs: list[DataKindDocument | OperatorDocument] = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.suffix in {".yaml", ".yml"}) if path.is_dir() else [path]
        for file in files:
            for raw in yaml.safe_load_all(file.read_text()):
                if raw is None:
                    continue
                _resolve_relative_command(raw, file.parent)
                try:
                    docs.append(parse_document(raw))
                except SpecError as exc:
                    raise SpecError(f"{file}: {exc}", exc.detail) from None
    return docs


def _resolve_relative_command(raw: Any, base: Path) -> None:
    """In a file, ``spec.command`` arguments starting with ``./`` name files beside it."""
    spec = raw.get("spec") if isinstance(raw, dict) else None
    command = spec.get("command") if isinstance(spec, dict) else None
    if isinstance(command, list):
        spec["command"] = [
            str((base / arg).resolve()) if isinstance(arg, str) and arg.startswith("./") else arg
            for arg in command
        ]
