"""The operator's output manifest, ``mlynar-out.json``, and its one validator.

An operator writes ``{"outputs": [{"dataKind": "...", "file": "..."}]}`` into its output directory
(``$MLYNAR_OUTPUT_DIR``). :func:`read_output_manifest` is the only place that decides whether such a
manifest is acceptable; the machine agent (:mod:`executors.agent.runner`), the Kubernetes upload
wrapper (:mod:`executors.kubernetes.wrapper`) and the step worker (:mod:`executors.worker`, through
:func:`check_kinds`) all use it. Standard library and pydantic only: the wrapper imports it inside
the step Job's pod.

Rules: the manifest exists, is a regular file inside the directory, at most
:data:`MAX_MANIFEST_BYTES`, valid JSON of the shape above; every output file contains no NUL,
resolves (symlinks followed) to a regular file strictly inside the directory and is not the
manifest itself; every data kind is one of the operator's ``possibleOutputKinds`` (when given).
Problems with single outputs are all collected into one :class:`OutputManifestError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST = "mlynar-out.json"
MAX_MANIFEST_BYTES = 16 * 1024**2
#: How the output directory is named in messages (the variable the operator receives).
OUTPUT_DIR = "MLYNAR_OUTPUT_DIR"


class OutputManifestError(Exception):
    """The manifest or one of its outputs is unacceptable; the message says what, for a user."""


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    data_kind: str = Field(alias="dataKind", min_length=1)
    file: str = Field(min_length=1)


class OutputManifest(BaseModel):
    """``$MLYNAR_OUTPUT_DIR/mlynar-out.json`` as written by the operator."""

    model_config = ConfigDict(extra="ignore")

    outputs: list[ManifestEntry]


@dataclass(frozen=True)
class CheckedOutput:
    """One accepted output: its index in the manifest, its kind, its real path and that path
    relative to the output directory (POSIX)."""

    index: int
    data_kind: str
    path: Path
    file: str


def kind_problem(index: int, kind: str, allowed: Iterable[str]) -> str | None:
    allowed = sorted(set(allowed))
    if kind in allowed:
        return None
    return f"output {index}: data kind {kind!r} is not in the operator's possibleOutputKinds {allowed}"


def check_kinds(kinds: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise :class:`OutputManifestError` naming every output whose kind is not allowed."""
    allowed = list(allowed)
    problems = [p for i, k in enumerate(kinds) if (p := kind_problem(i, k, allowed))]
    if problems:
        raise OutputManifestError("invalid output manifest: " + "; ".join(problems))


def parse_output_manifest(raw: bytes) -> OutputManifest:
    """JSON and shape of a manifest's bytes."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise OutputManifestError(f"{MANIFEST} is not valid JSON: {e}") from None
    try:
        return OutputManifest.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()
        )
        raise OutputManifestError(
            f'{MANIFEST} does not have the shape {{"outputs": [{{"dataKind": "...", "file": "..."}}]}}: '
            f"{problems}"
        ) from None


def read_output_manifest(out_dir: Path, allowed_kinds: Iterable[str] | None = None) -> list[CheckedOutput]:
    """Read and check ``out_dir/mlynar-out.json``; the accepted outputs in manifest order.

    ``allowed_kinds``: the operator's ``possibleOutputKinds``; ``None`` skips the kind check (the
    machine agent does not know them; the worker checks them with :func:`check_kinds`)."""
    try:
        root = out_dir.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise OutputManifestError(f"the output directory ({OUTPUT_DIR}) cannot be resolved: {e}") from None
    mf = out_dir / MANIFEST
    if not mf.exists() and not mf.is_symlink():
        raise OutputManifestError(
            f"operator wrote no {MANIFEST} in {OUTPUT_DIR}: {MANIFEST} is missing from the output directory; "
            'write {"outputs": []} when there is nothing to return')
    try:
        mf_real = mf.resolve()
    except (OSError, RuntimeError) as e:
        raise OutputManifestError(f"{MANIFEST} cannot be resolved: {e}") from None
    if not mf_real.is_relative_to(root) or not mf_real.is_file():
        raise OutputManifestError(f"{MANIFEST} is not a regular file inside {OUTPUT_DIR}")
    if mf_real.stat().st_size > MAX_MANIFEST_BYTES:
        raise OutputManifestError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    manifest = parse_output_manifest(mf_real.read_bytes())

    allowed = None if allowed_kinds is None else list(allowed_kinds)
    checked: list[CheckedOutput] = []
    problems: list[str] = []
    for i, entry in enumerate(manifest.outputs):
        if allowed is not None and (p := kind_problem(i, entry.data_kind, allowed)):
            problems.append(p)
        if (p := _file_problem(i, entry.file, out_dir, root, mf_real)) is not None:
            problems.append(p)
            continue
        real = (out_dir / entry.file).resolve()
        checked.append(CheckedOutput(i, entry.data_kind, real, real.relative_to(root).as_posix()))
    if problems:
        raise OutputManifestError("invalid output manifest: " + "; ".join(problems))
    return checked


def _file_problem(i: int, name: str, out_dir: Path, root: Path, manifest: Path) -> str | None:
    if "\x00" in name:
        return f"output {i}: file {name!r} contains a NUL character"
    try:
        real = (out_dir / name).resolve()
    except (OSError, RuntimeError) as e:
        return f"output {i}: file {name!r} cannot be resolved: {e}"
    if not real.is_relative_to(root) or real == root:
        return (f"output {i}: file {name!r} resolves outside {OUTPUT_DIR} ({real}): "
                "it lies outside the output directory")
    if not real.exists():
        return f"output {i}: file {name!r} does not exist in {OUTPUT_DIR}"
    if not real.is_file():
        return f"output {i}: file {name!r} is not a regular file"
    if real == manifest:
        return f"output {i}: the manifest itself cannot be an output"
    return None
