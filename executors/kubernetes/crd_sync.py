"""crd-sync: DataKind and Operator custom resources (``mlynar.dev/v1alpha1``) in the watched
namespaces, turned into registry events as they change.

* Which namespaces: ``--kube-watch-namespaces`` (``a,b``, or ``*`` for all, one cluster-wide
  list+watch per kind), by default only ``--kube-namespace``. The original Mlynar's example
  Operators pin ``metadata.namespace: default``; watching ``default`` too (or everything) takes
  them as they are. The registry has one entry per name: when several watched namespaces hold a
  resource of the same kind and name, the one in the namespace first in alphabetical order counts
  (the same on every restart), the others are logged and ignored until it goes away.

* At start and after every re-list: every DataKind is declared, then every Operator
  (``registry.declare`` appends nothing for an identical spec, so a restart appends nothing).
  Registry entries whose last declaration came from crd-sync but whose custom resource is gone
  (deleted while crd-sync was down) are deleted; entries declared through the REST API or
  ``--registry`` files are never touched by a re-list.
* Then both kinds are watched from the list's resourceVersion: ADDED/MODIFIED → declare,
  DELETED → ``delete_kind``/``delete_operator`` (NotFound ignored, Conflict — a kind still used by
  operators — logged). A dropped watch resumes from the last resourceVersion; 410 Gone re-lists.
* An Operator that arrives before the kinds it uses (two independent watches) is kept aside and
  declared as soon as those kinds are.
* An invalid object is logged with its name and the reason, and skipped; it never stops the
  watch.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, AsyncIterator

from mlynar_events import registry as reg
from mlynar_events.config import KubeSettings
from mlynar_events.errors import Conflict, Invalid, NotFound
from mlynar_events.events import DataKindDeclared, OperatorDeclared, of_aggregate, subject_filters
from mlynar_events.specs import SpecError, parse_document
from mlynar_events.store import ConcurrencyConflict, EventStore

from .kube import Kube, KubeError, new_api_client

log = logging.getLogger("mlynar.crd-sync")

GROUP, VERSION = "mlynar.dev", "v1alpha1"
PLURALS = {"DataKind": "datakinds", "Operator": "operators"}
ACTOR = "crd-sync"
ALL = "*"  # the scope of a cluster-wide watch


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", "?"))


def _where(obj: dict[str, Any]) -> tuple[str, str]:
    """(namespace, name): what identifies a resource across the watched namespaces."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", "?"))


class CrdSync:
    CONSUMES = reg.Registry.CONSUMES
    """Read back (not followed) to find what it declared earlier and may prune."""

    def __init__(self, kube: Kube | None, store: EventStore, enabled: bool = True,
                 namespaces: list[str] | None = None, *, all_namespaces: bool = False) -> None:
        self.kube = kube
        self.store = store
        self.enabled = enabled
        # the scopes watched: namespaces, or ALL (one cluster-wide watch per kind)
        self.scopes: list[str] = [ALL] if all_namespaces else (namespaces or ([kube.namespace] if kube else []))
        # what each watch currently shows: seen[kind][scope][(namespace, name)] = object
        self.seen: dict[str, dict[str, dict[tuple[str, str], dict[str, Any]]]] = {k: {} for k in PLURALS}
        self.waiting: dict[str, dict[str, Any]] = {}  # operators whose kinds are not declared yet
        self.synced = asyncio.Event()  # the first full list is applied (for tests and readiness)

    @classmethod
    async def create(cls, settings: KubeSettings, store: EventStore) -> "CrdSync":
        if not settings.watch_crds:
            log.warning("role crd-sync without --kube-watch-crds: custom resources are not watched")
            return cls(None, store, enabled=False)
        api = await new_api_client(settings)
        namespaces = settings.crd_namespaces()
        log.info("watching custom resources", extra={"namespaces": namespaces or "*"})
        return cls(Kube(api, settings.namespace), store, namespaces=namespaces, all_namespaces=namespaces is None)

    async def close(self) -> None:
        if self.kube is not None:
            await self.kube.close()

    async def run(self) -> None:
        if not self.enabled or self.kube is None:
            return
        while True:
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                # forbidden, CRDs not installed, API down for long: keep trying, slowly
                delay = 5.0 * (0.5 + random.random())
                log.error("custom resource watch failed; retrying", extra={"error": str(exc), "retry_in": round(delay, 1)})
                await asyncio.sleep(delay)

    def _stream(self, kind: str, scope: str) -> AsyncIterator[tuple[str, Any]]:
        """The list+watch of one kind in one scope (a namespace, or ALL)."""
        k = self.kube
        assert k is not None
        plural = PLURALS[kind]
        if scope == ALL:
            return k.list_and_watch(f"{plural}.{GROUP} in all namespaces", k.custom.list_cluster_custom_object,
                                    GROUP, VERSION, plural)
        return k.list_and_watch(f"{plural}.{GROUP} in namespace {scope}", k.custom.list_namespaced_custom_object,
                                GROUP, VERSION, scope, plural)

    async def _sync(self) -> None:
        streams = {(kind, scope): self._stream(kind, scope) for kind in PLURALS for scope in self.scopes}
        # the initial lists, data kinds first: operators are checked against them
        for (kind, scope), stream in streams.items():
            first, items = await stream.__anext__()
            assert first == "SYNC"
            self._listed(kind, scope, items)
        await self._full_sync(list(PLURALS))
        self.synced.set()
        queue: asyncio.Queue[tuple[str, str, str, Any]] = asyncio.Queue()

        async def pump(kind: str, scope: str) -> None:
            async for event, obj in streams[(kind, scope)]:
                await queue.put((kind, scope, event, obj))

        pumps = [asyncio.create_task(pump(kind, scope)) for kind, scope in streams]
        try:
            while True:
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, *pumps}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    for p in pumps:
                        if p.done():
                            p.result()  # raises the watch error
                    continue
                kind, scope, event, obj = getter.result()
                try:
                    if event == "SYNC":  # a re-list after 410 Gone
                        self._listed(kind, scope, obj)
                        await self._full_sync([kind])
                    elif event in {"ADDED", "MODIFIED"}:
                        self.seen[kind].setdefault(scope, {})[_where(obj)] = obj
                        if self._counting(kind, _name(obj)) is obj:
                            await self._declare(obj, kind)
                        else:
                            log.warning("custom resource ignored: the same name in another watched namespace counts",
                                        extra={"kind": kind, "resource": _name(obj), "namespace": _where(obj)[0]})
                    elif event == "DELETED":
                        self.seen[kind].get(scope, {}).pop(_where(obj), None)
                        other = self._counting(kind, _name(obj))
                        if other is not None:  # the same name remains in another namespace: it counts now
                            await self._declare(other, kind)
                        else:
                            await self._delete(obj, kind)
                except (KubeError, asyncio.CancelledError):
                    raise
                except Exception:  # one bad object never stops the watch
                    log.exception("custom resource event not applied",
                                  extra={"kind": kind, "event": event, "resource": _name(obj) if event != "SYNC" else "*"})
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for stream in streams.values():
                await stream.aclose()

    def _listed(self, kind: str, scope: str, items: list[dict[str, Any]]) -> None:
        """A (re)list of one watch: what it shows replaces what it showed before."""
        self.seen[kind][scope] = {_where(o): o for o in items}

    def _counting(self, kind: str, name: str) -> dict[str, Any] | None:
        """The resource of this kind and name that the registry follows: of those the watches
        show, the one in the alphabetically first namespace."""
        found = sorted(((where, obj) for objects in self.seen[kind].values() for where, obj in objects.items()
                        if where[1] == name), key=lambda item: item[0])
        return found[0][1] if found else None

    async def _full_sync(self, kinds: list[str]) -> None:
        """Declare what counts of each kind, then prune what crd-sync declared and no watch shows."""
        for kind in ("DataKind", "Operator"):
            if kind not in kinds:
                continue
            names = sorted({where[1] for objects in self.seen[kind].values() for where in objects})
            for name in names:
                obj = self._counting(kind, name)
                assert obj is not None
                duplicates = [w[0] for objects in self.seen[kind].values() for w in objects if w[1] == name]
                if len(duplicates) > 1:
                    log.warning("custom resource in several watched namespaces; the first counts",
                                extra={"kind": kind, "resource": name, "namespaces": sorted(duplicates)})
                try:
                    await self._declare(obj, kind)
                except Exception:  # one bad object never stops the sync
                    log.exception("custom resource not applied", extra={"kind": kind, "resource": name})
        for kind in kinds:
            await self._prune(kind, {where[1] for objects in self.seen[kind].values() for where in objects})

    async def _prune(self, kind: str, present: set[str]) -> None:
        """Delete what crd-sync declared earlier and whose custom resource no longer exists."""
        aggregate = "datakind" if kind == "DataKind" else "operator"
        last: dict[str, str] = {}
        for stored in await self.store.read(subject_filters(of_aggregate(aggregate))[0]):
            declared = isinstance(stored.event, (DataKindDeclared, OperatorDeclared))
            last[stored.event.name] = stored.envelope.actor if declared else ""  # type: ignore[attr-defined]
        for name, actor in sorted(last.items()):
            if actor == ACTOR and name not in present:
                log.info("custom resource disappeared while not watched", extra={"kind": kind, "resource": name})
                await self._delete({"metadata": {"name": name}}, kind)

    async def _declare(self, obj: dict[str, Any], kind: str) -> None:
        name = _name(obj)
        doc_in = {k: v for k, v in obj.items() if k in {"apiVersion", "kind", "metadata", "spec"}}
        doc_in.setdefault("kind", kind)
        try:
            doc = parse_document(doc_in, expect=kind)
        except SpecError as exc:
            log.error("invalid custom resource skipped", extra={"kind": kind, "resource": name, "error": str(exc),
                                                                "detail": exc.detail})
            return
        for _ in range(10):
            try:
                seq, registry = await reg.declare(self.store, doc, actor=ACTOR)
                break
            except ConcurrencyConflict:
                continue  # someone else changed it meanwhile: decide again
            except Invalid as exc:
                if kind == "Operator" and "undeclared" in str(exc):
                    log.info("operator waits for its data kinds", extra={"resource": name, "error": exc.message})
                    self.waiting[name] = obj
                else:
                    log.error("custom resource rejected", extra={"kind": kind, "resource": name, "error": exc.message})
                return
        else:
            log.error("custom resource not applied: registry changing too fast", extra={"kind": kind, "resource": name})
            return
        if kind == "Operator":
            self.waiting.pop(name, None)
        if seq is not None:
            log.info("custom resource applied", extra={"kind": kind, "resource": name, "seq": seq})
        if kind == "DataKind" and self.waiting:
            for op_name, op in list(self.waiting.items()):
                if not registry.undeclared_kinds(parse_document(op, expect="Operator").spec):  # type: ignore[union-attr]
                    self.waiting.pop(op_name, None)
                    await self._declare(op, "Operator")

    async def _delete(self, obj: dict[str, Any], kind: str) -> None:
        name = _name(obj)
        if kind == "Operator":
            self.waiting.pop(name, None)
        delete = reg.delete_kind if kind == "DataKind" else reg.delete_operator
        for _ in range(10):
            try:
                await delete(self.store, name, actor=ACTOR)
                log.info("custom resource deleted", extra={"kind": kind, "resource": name})
                return
            except ConcurrencyConflict:
                continue
            except NotFound:
                log.info("custom resource deleted; not in the registry", extra={"kind": kind, "resource": name})
                return
            except Conflict as exc:
                log.warning("custom resource deleted but still in use; kept in the registry",
                            extra={"kind": kind, "resource": name, "error": exc.message})
                return
