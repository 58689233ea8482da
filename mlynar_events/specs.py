"""DataKind and Operator specs, accepted exactly as Mlynar's CRD documents are written
(``apiVersion: mlynar.dev/v1alpha1``) plus our extensions (``machine``, ``command``,
``timeoutSeconds``, ``retries``, ``resources``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Iterable

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

from .names import NAME_JSON_SCHEMA, check_dns1123_label

log = logging.getLogger("mlynar.specs")

Name = Annotated[str, AfterValidator(check_dns1123_label), WithJsonSchema(NAME_JSON_SCHEMA)]
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
API_VERSION = "mlynar.dev/v1alpha1"
API_GROUP = API_VERSION.split("/", 1)[0]


def _env_name(name: str) -> str:
    if not ENV_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid environment variable name")
    if name == "MLYNAR_OUTPUT_DIR":
        raise ValueError("MLYNAR_OUTPUT_DIR is set by the runner and cannot be declared")
    return name


EnvName = Annotated[str, AfterValidator(_env_name), WithJsonSchema(
    {"type": "string", "pattern": ENV_NAME.pattern, "not": {"const": "MLYNAR_OUTPUT_DIR"}})]


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
    # the JSON schema says what _check demands (but not that fileLocationEnv values differ)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={
        "if": {"required": ["machine"], "properties": {"machine": {"type": "string"}}},
        "then": {"required": ["command"], "properties": {"command": {"minItems": 1}}},
        "else": {"required": ["image"], "properties": {"image": {"type": "string", "minLength": 1}}},
    })
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
    apiVersion: str = Field(API_VERSION, json_schema_extra={"const": API_VERSION})
    kind: str = Field("DataKind", json_schema_extra={"const": "DataKind"})
    metadata: Metadata
    spec: DataKindSpec = Field(default_factory=DataKindSpec)


class OperatorDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    apiVersion: str = Field(API_VERSION, json_schema_extra={"const": API_VERSION})
    kind: str = Field("Operator", json_schema_extra={"const": "Operator"})
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


def is_registry_document(raw: Any) -> bool:
    """A DataKind or Operator of our API group (any version: a wrong version is then a clear
    error). Anything else in a folder of YAML (a Helm values file, a Deployment) is foreign."""
    return (isinstance(raw, dict) and raw.get("kind") in {"DataKind", "Operator"}
            and str(raw.get("apiVersion", API_VERSION)).split("/", 1)[0] == API_GROUP)


def load_documents(paths: Iterable[Path], skipped: list[str] | None = None) -> list[DataKindDocument | OperatorDocument]:
    """All DataKind/Operator documents from files and directories (``*.yaml``/``*.yml``, sorted).

    Foreign documents are skipped with one log line each (and listed in ``skipped`` when given):
    a folder such as the original Mlynar's ``examples/`` also holds other Kubernetes YAML. A file
    that is not YAML, or a registry document that is invalid, is a :class:`SpecError` naming it."""
    docs: list[DataKindDocument | OperatorDocument] = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.suffix in {".yaml", ".yml"}) if path.is_dir() else [path]
        for file in files:
            try:
                raws = list(yaml.safe_load_all(file.read_text()))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise SpecError(f"{file}: not readable as YAML: {str(exc).splitlines()[0]}") from None
            for n, raw in enumerate(raws):
                if raw is None:
                    continue
                if not is_registry_document(raw):
                    what = f"{raw.get('kind')} {raw.get('apiVersion')}" if isinstance(raw, dict) and raw.get("kind") \
                        else "not a Kubernetes document"
                    note = f"{file} (document {n + 1}): skipped, {what}"
                    log.info("registry file: %s", note, extra={"file": str(file)})
                    if skipped is not None:
                        skipped.append(note)
                    continue
                resolve_relative_command(raw, file.parent)
                try:
                    docs.append(parse_document(raw))
                except SpecError as exc:
                    raise SpecError(f"{file}: {exc}", exc.detail) from None
    return docs


def resolve_relative_command(raw: Any, base: Path) -> None:
    """In a file, ``spec.command`` arguments starting with ``./`` name files beside it."""
    spec = raw.get("spec") if isinstance(raw, dict) else None
    command = spec.get("command") if isinstance(spec, dict) else None
    if isinstance(command, list):
        spec["command"] = [
            str((base / arg).resolve()) if isinstance(arg, str) and arg.startswith("./") else arg
            for arg in command
        ]
