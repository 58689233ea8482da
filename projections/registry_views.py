"""The registry views (``data_kinds``, ``operators``, ``machines``): the latest declaration of
each name, or none once deleted."""

from __future__ import annotations

import json

from mlynar_events.events import (
    DataKindDeclared, DataKindDeleted, MachineDeleted, MachineRegistered, MachineUpdated,
    OperatorDeclared, OperatorDeleted,
)

from .batch import Batch, handles


@handles(DataKindDeclared)
def _kind_declared(b: Batch, e: DataKindDeclared, seq: int, at: str) -> None:
    b.execute("INSERT OR REPLACE INTO data_kinds VALUES (?, ?, ?)", (e.name, e.spec.model_dump_json(), seq))


@handles(DataKindDeleted)
def _kind_deleted(b: Batch, e: DataKindDeleted, seq: int, at: str) -> None:
    b.execute("DELETE FROM data_kinds WHERE name = ?", (e.name,))


@handles(OperatorDeclared)
def _op_declared(b: Batch, e: OperatorDeclared, seq: int, at: str) -> None:
    b.execute(
        "INSERT OR REPLACE INTO operators VALUES (?, ?, ?, ?)",
        (e.name, e.spec.model_dump_json(exclude_defaults=True), e.revision, seq),
    )


@handles(OperatorDeleted)
def _op_deleted(b: Batch, e: OperatorDeleted, seq: int, at: str) -> None:
    b.execute("DELETE FROM operators WHERE name = ?", (e.name,))


@handles(MachineRegistered, MachineUpdated)
def _machine(b: Batch, e: MachineRegistered, seq: int, at: str) -> None:
    b.execute(
        "INSERT INTO machines VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
        " url = excluded.url, labels = excluded.labels, has_token = excluded.has_token,"
        " updated_at = excluded.updated_at, owner = excluded.owner, shared_with = excluded.shared_with",
        (e.name, e.url, json.dumps(e.labels), int(e.token_ref is not None), at, at, e.owner,
         json.dumps(e.shared_with)),
    )


@handles(MachineDeleted)
def _machine_deleted(b: Batch, e: MachineDeleted, seq: int, at: str) -> None:
    b.execute("DELETE FROM machines WHERE name = ?", (e.name,))
