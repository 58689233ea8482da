"""``mlynar apply -f FILE_OR_DIR``: DataKind and Operator documents from YAML, declared over the
API like ``kubectl apply``: each document is reported ``created``, ``configured`` (its spec changed:
an operator gets a new revision) or ``unchanged`` (the service appended nothing).

The documents are read and checked here exactly as ``mlynar serve --registry`` reads them
(:func:`mlynar_events.specs.load_documents`, pure), so a typo fails before anything is sent,
``./`` in an operator's ``command`` is resolved against the YAML file's directory (an absolute
path on *this* machine: right for the built-in machine ``local`` of a service on the same host),
and other Kubernetes documents in the same files (a Deployment next to the operators) are skipped
with a note. All DataKinds are declared before any Operator, since an operator may only use declared
kinds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlynar_events.specs import SpecError, load_documents

from .http import USAGE, Api, ApiError, CliError, short_detail
from .models import Declared

KINDS = {"DataKind": "/api/data-kinds", "Operator": "/api/operators"}


@dataclass
class Document:
    kind: str
    name: str
    body: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.kind.lower()}/{self.name}"


def read_documents(paths: list[Path]) -> tuple[list[Document], list[str]]:
    """The Mlynar documents of ``paths``, read as ``mlynar serve --registry`` reads them
    (:func:`mlynar_events.specs.load_documents`: checked, commands resolved), and a note per
    foreign document skipped. A file that cannot be read or a document of ours that is invalid is
    a usage error naming it."""
    notes: list[str] = []
    try:
        docs = load_documents(paths, skipped=notes)
    except SpecError as exc:
        detail = short_detail(exc.detail)
        raise CliError(f"{exc}" + (f": {detail}" if detail else ""), USAGE) from None
    return [Document(d.kind, d.metadata.name, d.model_dump(mode="json")) for d in docs], notes


@dataclass
class Outcome:
    doc: Document
    result: str  # created | configured | unchanged | error
    revision: int | None = None
    error: str | None = None

    def json(self) -> dict[str, Any]:
        out = {"kind": self.doc.kind, "name": self.doc.name, "result": self.result}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.error:
            out["error"] = self.error
        return out


async def apply(api: Api, docs: list[Document]) -> list[Outcome]:
    """Declare every document, DataKinds first. A refused document is reported and the rest
    still applied (as kubectl does); the caller turns any refusal into a non-zero exit."""
    existing = {kind: {item["metadata"]["name"] for item in await api.get(path)} for kind, path in KINDS.items()}
    outcomes = []
    for kind in KINDS:
        for doc in (d for d in docs if d.kind == kind):
            try:
                answer = Declared.model_validate(await api.json("POST", KINDS[kind], json=doc.body))
            except ApiError as exc:
                outcomes.append(Outcome(doc, "error", error=exc.message))
                continue
            result = "unchanged" if not answer.changed else "configured" if doc.name in existing[kind] else "created"
            existing[kind].add(doc.name)
            outcomes.append(Outcome(doc, result, answer.revision))
    return outcomes
