"""The registry (data kinds and operators) folded from its events, and the commands that change
it. Shared by the API (validation), the solver (which operators a unit feeds) and start-up
(declaring ``--registry`` files)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Conflict, Invalid, NotFound
from .events import DataKindDeclared, DataKindDeleted, Event, OperatorDeclared, OperatorDeleted, subject_filters
from .specs import DataKindDocument, DataKindSpec, OperatorDocument, OperatorSpec
from .store import EventStore


@dataclass
class Registry:
    CONSUMES = (DataKindDeclared, DataKindDeleted, OperatorDeclared, OperatorDeleted)
    kinds: dict[str, DataKindSpec] = field(default_factory=dict)
    operators: dict[str, tuple[OperatorSpec, int]] = field(default_factory=dict)
    # operator names per input kind, rebuilt on every operator change (rare) so lookups are O(1)
    consumers: dict[str, list[str]] = field(default_factory=dict)
    version: int = 0
    seqs: dict[tuple[str, str], int] = field(default_factory=dict)  # (aggregate, name) -> last seq

    def apply(self, event: Event, seq: int = 0) -> bool:
        """Fold one event; ``False`` when it is not a registry event."""
        match event:
            case DataKindDeclared():
                self.kinds[event.name] = event.spec
            case DataKindDeleted():
                self.kinds.pop(event.name, None)
            case OperatorDeclared():
                self.operators[event.name] = (event.spec, event.revision)
                self._reindex()
            case OperatorDeleted():
                self.operators.pop(event.name, None)
                self._reindex()
            case _:
                return False
        self.version = max(self.version, seq)
        self.seqs[(event.aggregate, event.name)] = seq
        return True

    def _reindex(self) -> None:
        consumers: dict[str, list[str]] = {}
        for name in sorted(self.operators):
            spec, _ = self.operators[name]
            for kind in dict.fromkeys(i.dataKind for i in spec.inputs):
                consumers.setdefault(kind, []).append(name)
        self.consumers = consumers

    def undeclared_kinds(self, spec: OperatorSpec) -> list[str]:
        return sorted(k for k in spec.kinds() if k not in self.kinds)

    def operators_using_kind(self, kind: str) -> list[str]:
        return sorted(
            name for name, (spec, _) in self.operators.items() if kind in spec.kinds()
        )

    def reachable_operators(self, kinds: set[str]) -> list[str]:
        """Mlynar's ``/params``: operators runnable from ``kinds``, to a fixpoint over
        ``possibleOutputKinds``."""
        have, found = set(kinds), set()
        changed = True
        while changed:
            changed = False
            for name, (spec, _) in self.operators.items():
                if name not in found and all(i.dataKind in have for i in spec.inputs):
                    found.add(name)
                    new = set(spec.possibleOutputKinds) - have
                    have |= new
                    changed = True
        return sorted(found)


# ---- commands ---------------------------------------------------------------------------------
# Each decides from the registry as read from the stream and appends with the aggregate's
# expected sequence, so two writers can't both bump an operator to the same revision.


async def load_registry(store: EventStore) -> Registry:
    registry = Registry()
    for kind_filter in subject_filters(Registry.CONSUMES):
        for stored in await store.read(kind_filter):
            registry.apply(stored.event, stored.seq)
    return registry


async def declare(
    store: EventStore, doc: DataKindDocument | OperatorDocument, actor: str,
    registry: Registry | None = None,
) -> tuple[int | None, Registry]:
    """Declare a kind or operator. Returns the appended sequence, ``None`` if the identical
    spec was already declared (nothing is appended), and the registry after the change."""
    registry = registry or await load_registry(store)
    name = doc.metadata.name
    if isinstance(doc, DataKindDocument):
        if registry.kinds.get(name) == doc.spec:
            return None, registry
        event: Event = DataKindDeclared(name=name, spec=doc.spec)
    else:
        missing = registry.undeclared_kinds(doc.spec)
        if missing:
            raise Invalid(f"operator {name!r} uses undeclared data kinds {missing}", {"undeclaredKinds": missing})
        current = registry.operators.get(name)
        if current is not None and current[0] == doc.spec:
            return None, registry
        event = OperatorDeclared(name=name, spec=doc.spec, revision=(current[1] + 1) if current else 1)
    ack = await store.append(event, actor=actor, expected_seq=registry.seqs.get((event.aggregate, name), 0))
    registry.apply(event, ack.seq)
    return ack.seq, registry


async def delete_kind(store: EventStore, name: str, actor: str) -> int:
    registry = await load_registry(store)
    if name not in registry.kinds:
        raise NotFound(f"data kind {name!r} does not exist")
    users = registry.operators_using_kind(name)
    if users:
        raise Conflict(f"data kind {name!r} is used by operators {users}", {"operators": users})
    ack = await store.append(DataKindDeleted(name=name), actor=actor,
                             expected_seq=registry.seqs.get(("datakind", name), 0))
    return ack.seq


async def delete_operator(store: EventStore, name: str, actor: str) -> int:
    registry = await load_registry(store)
    if name not in registry.operators:
        raise NotFound(f"operator {name!r} does not exist")
    ack = await store.append(OperatorDeleted(name=name), actor=actor,
                             expected_seq=registry.seqs.get(("operator", name), 0))
    return ack.seq
