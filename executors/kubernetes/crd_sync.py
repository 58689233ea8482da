"""crd-sync: DataKind and Operator custom resources (``mlynar.dev/v1alpha1``) in the namespace,
turned into registry events as they change.

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
from typing import Any

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


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", "?"))


class CrdSync:
    CONSUMES = reg.Registry.CONSUMES
    """Read back (not followed) to find what it declared earlier and may prune."""

    def __init__(self, kube: Kube | None, store: EventStore, enabled: bool = True) -> None:
        self.kube = kube
        self.store = store
        self.enabled = enabled
        self.waiting: dict[str, dict[str, Any]] = {}  # operators whose kinds are not declared yet
        self.synced = asyncio.Event()  # the first full list is applied (for tests and readiness)

    @classmethod
    async def create(cls, settings: KubeSettings, store: EventStore) -> "CrdSync":
        if not settings.watch_crds:
            log.warning("role crd-sync without --kube-watch-crds: custom resources are not watched")
            return cls(None, store, enabled=False)
        api = await new_api_client(settings)
        return cls(Kube(api, settings.namespace), store)

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

    async def _sync(self) -> None:
        k = self.kube
        assert k is not None
        lists: dict[str, list[dict[str, Any]]] = {}
        streams = {
            kind: k.list_and_watch(f"{plural}.{GROUP}", k.custom.list_namespaced_custom_object, GROUP, VERSION,
                                   k.namespace, plural)
            for kind, plural in PLURALS.items()
        }
        # the initial lists, data kinds first: operators are checked against them
        for kind, stream in streams.items():
            first, items = await stream.__anext__()
            assert first == "SYNC"
            lists[kind] = items
        await self._full_sync(lists)
        self.synced.set()
        queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()

        async def pump(kind: str) -> None:
            async for event, obj in streams[kind]:
                await queue.put((kind, event, obj))

        pumps = [asyncio.create_task(pump(kind)) for kind in streams]
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
                kind, event, obj = getter.result()
                try:
                    if event == "SYNC":  # a re-list after 410 Gone
                        lists[kind] = obj
                        await self._full_sync({kind: obj})
                    elif event in {"ADDED", "MODIFIED"}:
                        await self._declare(obj, kind)
                    elif event == "DELETED":
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

    async def _full_sync(self, lists: dict[str, list[dict[str, Any]]]) -> None:
        for kind in ("DataKind", "Operator"):
            for obj in sorted(lists.get(kind, []), key=_name):
                try:
                    await self._declare(obj, kind)
                except Exception:  # one bad object never stops the sync
                    log.exception("custom resource not applied", extra={"kind": kind, "resource": _name(obj)})
        for kind, items in lists.items():
            await self._prune(kind, {_name(o) for o in items})

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
