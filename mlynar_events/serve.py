"""Process wiring: start the parts this process hosts (``--roles``) around one event store.

With no ``--nats-url`` the embedded nats-server is started as a child process; with
``--local-machine`` (the default) a machine agent runs in-process on loopback and is registered
as machine ``local``. Roles never call each other: they are only started side by side here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from . import registry as registry_commands
from .blobs import FileBlobStore
from .config import ServeSettings, is_loopback
from .events import MachineRegistered, MachineUpdated, key_filter
from .nats_server import EmbeddedNats
from .secrets import SecretStore, machine_token_key, secret_ref
from .solver import Solver
from .specs import load_documents
from .store import EventStore
from .tasks import cancel_and_wait

log = logging.getLogger("mlynar.serve")
LOCAL_MACHINE = "local"
STOP_TIMEOUT = 10.0


class Service:
    """Everything one ``mlynar serve`` process runs; ``start()`` then ``stop()``."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.nats: EmbeddedNats | None = None
        self.store: EventStore | None = None
        self.tasks: list[asyncio.Task] = []
        self.closers: list[Callable[[], Awaitable[Any]]] = []
        self.api_url: str | None = None
        self.failed = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        _check_exposure(s)
        s.data_dir.mkdir(parents=True, exist_ok=True)
        url = s.nats_url
        if not url:
            self.nats = EmbeddedNats(s.data_dir / "nats")
            url = await self.nats.start()
        self.store = store = await EventStore.connect(url, duplicate_window=s.duplicate_window, replicas=s.stream_replicas)
        secrets = await SecretStore.open(store.js, s.stream_replicas)
        blobs = FileBlobStore(s.resolved_blob_dir)
        if s.registry:
            await self._declare_registry(store, s.registry)
        roles = set(s.roles)
        if "executor" in roles and s.local_machine:
            await self._start_local_agent(store, secrets)
        if "api" in roles or "projector" in roles:
            await self._start_api(store, blobs, secrets, serve_http="api" in roles)
        if "solver" in roles:
            self._spawn("solver", Solver(store, max_steps_per_run=s.max_steps_per_run).run())
        if "executor" in roles:
            await self._start_executor(store, blobs, secrets)
        if "crd-sync" in roles:
            await self._start_crd_sync(store)
        log.info("mlynar serving", extra={"roles": ",".join(sorted(roles)), "nats": url, "api": self.api_url})

    def _spawn(self, name: str, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(name)

        def done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("role %s crashed", name, exc_info=t.exception())
                self.failed.set()

        task.add_done_callback(done)
        self.tasks.append(task)
        return task

    async def _declare_registry(self, store: EventStore, paths: list[Path]) -> None:
        docs = load_documents(paths)
        # kinds first: operators are checked against them
        docs.sort(key=lambda d: d.kind != "DataKind")
        reg = await registry_commands.load_registry(store)
        changed = 0
        for doc in docs:
            seq, reg = await registry_commands.declare(store, doc, actor="registry-file", registry=reg)
            changed += seq is not None
        log.info("registry files loaded", extra={"documents": len(docs), "changed": changed})

    async def _start_local_agent(self, store: EventStore, secrets: SecretStore) -> None:
        from executors.agent.app import start_agent
        from executors.agent.settings import AgentSettings

        token = await secrets.get_or_create(machine_token_key(LOCAL_MACHINE))
        agent = await start_agent(AgentSettings(host="127.0.0.1", port=0, token=token,
                                                work_dir=self.settings.data_dir / "agent"))
        self.closers.append(agent.stop)
        ref = secret_ref(machine_token_key(LOCAL_MACHINE))
        registry = await store.read(key_filter("machine", LOCAL_MACHINE))
        current = registry[-1].event if registry else None
        if not isinstance(current, MachineRegistered) or current.url != agent.url or current.token_ref != ref:
            cls = MachineUpdated if isinstance(current, MachineRegistered) else MachineRegistered
            await store.append(cls(name=LOCAL_MACHINE, url=agent.url, labels={"builtin": "true"}, token_ref=ref),
                               actor="serve")
        log.info("built-in machine 'local' ready", extra={"url": agent.url})

    async def _start_api(self, store: EventStore, blobs: FileBlobStore, secrets: SecretStore, serve_http: bool) -> None:
        from api.app import create_app
        from api.context import ApiContext
        from projections.projector import Projector, open_db

        s = self.settings
        db = await open_db(s.resolved_db_path)
        self.closers.append(db.close)
        projector = Projector(store, db)
        self._spawn("projector", projector.run())
        if not serve_http:
            return
        token = s.api_token_file.read_text().strip() if s.api_token_file else None
        app = create_app(ApiContext(
            store=store, blobs=blobs, secrets=secrets, db=db, projector=projector,
            max_upload_bytes=s.max_upload_bytes, max_json_bytes=s.max_json_bytes,
            default_max_parallel=s.max_parallel, api_token=token, public_url=s.public_url,
        ))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, s.host, s.port)
        await site.start()
        self.closers.append(runner.cleanup)
        port = runner.addresses[0][1] if runner.addresses else s.port  # the bound port when --port 0
        self.api_url = f"http://{s.host}:{port}"

    async def _start_executor(self, store: EventStore, blobs: FileBlobStore, secrets: SecretStore) -> None:
        from executors.machine import MachineBackend, MachineDirectory
        from executors.worker import StepWorker

        directory = MachineDirectory(store)
        self._spawn("machines", directory.run())
        machines = MachineBackend(directory, secrets, blobs)
        self.closers.append(machines.close)
        backends: dict[str, Any] = {"machine": machines}
        kube = await self._kubernetes_backend(store, blobs, secrets)
        if kube is not None:
            backends["kubernetes"] = kube
        worker = StepWorker(store, blobs, backends, concurrency=self.settings.executor_concurrency,
                            ack_wait=self.settings.executor_ack_wait, workdir=self.settings.data_dir / "executor")
        self._spawn("executor", worker.run())

    async def _kubernetes_backend(self, store: EventStore, blobs: FileBlobStore, secrets: SecretStore) -> Any:
        s = self.settings
        if not (s.kube.in_cluster or s.kube.config):
            return None
        from executors.kubernetes.backend import KubernetesBackend

        backend = await KubernetesBackend.create(s.kube, secrets, store, blobs)
        self.closers.append(backend.close)
        return backend

    async def _start_crd_sync(self, store: EventStore) -> None:
        from executors.kubernetes.crd_sync import CrdSync

        sync = await CrdSync.create(self.settings.kube, store)
        self.closers.append(sync.close)
        self._spawn("crd-sync", sync.run())

    async def stop(self) -> None:
        await cancel_and_wait(self.tasks, STOP_TIMEOUT)
        for close in reversed(self.closers):
            try:
                await asyncio.wait_for(close(), STOP_TIMEOUT)
            except Exception:  # noqa: BLE001 - stopping goes on; the reason is logged
                log.exception("closing %s failed", getattr(close, "__qualname__", close))
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.nats is not None:
            await self.nats.stop()
        log.info("mlynar stopped")


class ConfigError(Exception):
    """Settings that must not start (the CLI prints the message and exits 2)."""


def _check_exposure(s: ServeSettings) -> None:
    """An API reachable beyond this machine needs a token, unless the operator says otherwise."""
    if "api" in s.roles and not is_loopback(s.host) and s.api_token_file is None and not s.insecure_no_auth:
        raise ConfigError(
            f"refusing to serve the API on {s.host} without --api-token-file "
            "(pass --insecure-no-auth to do it anyway)")
    if s.api_token_file is not None and not s.api_token_file.is_file():
        raise ConfigError(f"--api-token-file {s.api_token_file} does not exist")


async def serve_forever(settings: ServeSettings, after_start: Callable[[Service], Awaitable[Any]] | None = None) -> int:
    service = Service(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        if after_start is not None:
            asyncio.ensure_future(after_start(service))
        failed = asyncio.ensure_future(service.failed.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        return 1 if service.failed.is_set() else 0
    finally:
        await service.stop()
