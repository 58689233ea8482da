"""Process wiring: start the parts this process hosts (``--roles``) around one event store.

With no ``--nats-url`` the embedded nats-server is started as a child process (requiring a
generated NKey, supervised); with ``--local-machine`` (the default) a machine agent runs in-process on
loopback and is registered as machine ``local``. Roles never call each other: they are only started
side by side here, each in the same lifecycle (:mod:`mlynar_events.roles`).

The data directory belongs to one process at a time (:func:`lock_data_dir`): a second ``serve`` on
it would start a second nats-server on the same JetStream files. It and everything secret in it
(keys, blobs, the projection database) are readable by its owner only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from . import registry as registry_commands
from .blobs import FileBlobStore
from .config import ServeSettings, is_loopback
from .events import STREAM, MachineRegistered, MachineUpdated, key_filter
from .nats_connect import NatsOptions, NatsUnavailable
from .nats_server import EmbeddedNats, embedded_credentials
from .principals import EVERYONE
from .secrets import SecretCipher, SecretsLocked, SecretStore, machine_token_key, private_dir, secret_ref
from .solver import Solver
from .errors import CommandError
from .specs import SpecError, load_documents
from .store import EventStore
from .roles import Role, closing, hosted

log = logging.getLogger("mlynar.serve")
CATCH_UP_TIMEOUT = 60.0
"""Seconds the API waits at start for its projection to reach the stream's head (then it serves
anyway, with a warning: a huge backlog must not keep the service down)."""
LOCAL_MACHINE = "local"
LOCK_FILE = "lock"
KEYS_DIR = "keys"


class DataDirLock:
    """An exclusive ``flock`` on ``DATA_DIR/lock`` holding the holder's pid, for the process's
    life: the kernel releases it when the process dies, however it dies, so a crash never leaves
    a stale lock behind."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "DataDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"data directory {self.path.parent} is in use by another mlynar process "
                              f"(pid {holder}, lock {self.path}); stop it or give another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    async def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Make ``data_dir`` (0700) and lock it; :class:`ConfigError` naming the holder's pid."""
    private_dir(data_dir)
    return DataDirLock(data_dir).acquire()


def private_files(settings: ServeSettings) -> None:
    """Only the owner reads what the service keeps: the data directory and a blob directory
    elsewhere are 0700, the projection database 0600 (created so before SQLite opens it; its
    journal files take its mode). Tightens a data directory made by an older version."""
    private_dir(settings.data_dir)
    private_dir(settings.resolved_blob_dir)
    db = settings.resolved_db_path
    db.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists():
            os.chmod(path, 0o600)


async def start_nats(settings: ServeSettings) -> tuple[NatsOptions, EmbeddedNats | None]:
    """How this process reaches NATS: ``--nats-url`` with its credential flags, or a new embedded
    server (its NKey seed in the data directory) that the caller must stop (and may supervise)."""
    s = settings.store
    if s.nats_url:
        try:
            return s.nats_options(), None
        except (ValueError, OSError) as exc:
            raise ConfigError(f"NATS settings: {exc}") from None
    keys = private_dir(settings.data_dir / KEYS_DIR)
    seed = embedded_credentials(keys)
    nats = EmbeddedNats(settings.data_dir / "nats", nkey_seed=seed, config_file=keys / "nats-server.conf")
    url = await nats.start()
    return NatsOptions(servers=[url], nkey_seed=seed, connect_timeout=s.nats_connect_timeout), nats


def secrets_cipher(settings: ServeSettings) -> SecretCipher | None:
    """The key encrypting the secrets bucket: ``--secrets-key-file``, else (embedded NATS) the data
    directory's own, generated on first use; ``None`` (warned) for an external NATS without one,
    where a per-directory key would differ between replicas."""
    s = settings.store
    try:
        if s.secrets_key_file is not None:
            return SecretCipher.from_file(s.secrets_key_file)
        if not s.nats_url:
            return SecretCipher.from_file(private_dir(settings.data_dir / KEYS_DIR) / "secrets.key", create=True)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    log.warning("secrets in the NATS bucket are stored unencrypted: give every replica the same "
                "--secrets-key-file to encrypt them")
    return None


async def report_stream_replicas(store: EventStore, wanted: int) -> None:
    """Say so when the stream's replica count is not ``--stream-replicas`` after the store tried
    to raise it (``EventStore.ensure_stream``): too few nodes to raise it, or more than asked
    (never lowered by a process)."""
    try:
        info = await store.js.stream_info(STREAM)
    except Exception as exc:  # noqa: BLE001 - a report, not a precondition
        log.warning("could not read the stream's settings", extra={"error": str(exc)})
        return
    actual = info.config.num_replicas or 1
    if actual != wanted:
        why = ("the cluster could not place more (too few nodes, or a single server)" if actual < wanted else
               f"a process never lowers it; lower it on purpose with 'nats stream edit {STREAM} --replicas {wanted}'")
        log.warning(f"stream {STREAM} has {actual} replica(s) but --stream-replicas is {wanted}: {why} "
                    "(or pass the stream's own count)",
                    extra={"stream": STREAM, "replicas": actual, "wanted": wanted})


class Service:
    """Everything one ``mlynar serve`` process runs: ``async with Service(settings)`` (or
    ``start()`` then ``stop()``). Roles and the resources they use are entered on one exit stack
    (see :mod:`mlynar_events.roles`), so stopping drains roles before closing what they use."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.store: EventStore | None = None
        self.api_url: str | None = None
        self.metrics_url: str | None = None  # --metrics-port's /metrics, when served
        self.nats: EmbeddedNats | None = None
        self.failed = asyncio.Event()
        self.failure: str | None = None  # why, once ``failed`` is set
        self._stack = contextlib.AsyncExitStack()
        self._local: tuple[str, str] | None = None  # (url, token ref) of the built-in agent

    async def __aenter__(self) -> "Service":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        s = self.settings
        _check_exposure(s)
        lock = lock_data_dir(s.data_dir)
        self._on_stop(lock.release)  # the first pushed: released last
        try:
            private_files(s)
            await self._start(s)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, s: ServeSettings) -> None:
        cipher = secrets_cipher(s)
        options, nats = await start_nats(s)
        if nats is not None:
            self._on_stop(nats.stop)
            self.nats = nats
            await self._host("nats-server", nats)  # supervised; stopped after the store closes
        self.store = store = await EventStore.connect(options, duplicate_window=s.store.duplicate_window,
                                                      replicas=s.store.stream_replicas)
        self._on_stop(store.close)
        await report_stream_replicas(store, s.store.stream_replicas)
        try:
            secrets = await SecretStore.open(store.js, s.store.stream_replicas, cipher)
        except SecretsLocked as exc:
            raise ConfigError(str(exc)) from None
        url = ",".join(options.servers)
        blobs = FileBlobStore(s.resolved_blob_dir)
        if s.registry:
            await self._declare_registry(store, s.registry)
        roles = set(s.roles)
        if "executor" in roles and s.local_machine:
            await self._start_local_agent(store, secrets)
        if "api" in roles or "projector" in roles:
            await self._start_api(store, blobs, secrets, serve_http="api" in roles)
        if "solver" in roles:
            await self._host("solver", Solver(store, max_steps_per_run=s.solver.max_steps_per_run))
        if "executor" in roles:
            await self._start_executor(store, blobs, secrets)
        if "crd-sync" in roles:
            await self._start_crd_sync(store)
        if "webhooks" in roles:
            await self._start_webhooks(store, secrets)
        if s.metrics.port:
            await self._start_metrics()
        log.info("mlynar serving", extra={"roles": ",".join(sorted(roles)), "nats": url, "api": self.api_url,
                                            "metrics": self.metrics_url})

    async def _host(self, name: str, role: Role) -> None:
        await self._stack.enter_async_context(hosted(name, role, self._crashed))

    def _crashed(self, name: str, exc: BaseException) -> None:
        self.failure = f"{name} failed: {exc}"
        self.failed.set()

    def _on_stop(self, close: Callable[[], Awaitable[Any]]) -> None:
        self._stack.push_async_callback(closing(close))

    async def _declare_registry(self, store: EventStore, paths: list[Path]) -> None:
        """Declare the ``--registry`` files; a document that cannot be declared (invalid, or an
        operator whose kinds no file and no earlier declaration gives) stops the start with
        one clear line (exit 2), never a traceback."""
        try:
            docs = load_documents(paths)
        except SpecError as exc:
            raise ConfigError(f"--registry: {exc}") from None
        # kinds first (of all files): operators are checked against them
        docs.sort(key=lambda d: d.kind != "DataKind")
        reg = await registry_commands.load_registry(store)
        changed = 0
        for doc in docs:
            try:
                seq, reg = await registry_commands.declare(store, doc, actor="registry-file", registry=reg)
            except CommandError as exc:
                raise ConfigError(f"--registry: {doc.kind} {doc.metadata.name}: {exc.message}") from None
            changed += seq is not None
        log.info("registry files loaded", extra={"documents": len(docs), "changed": changed})

    async def _start_local_agent(self, store: EventStore, secrets: SecretStore) -> None:
        from executors.agent.app import start_agent
        from executors.agent.settings import AgentSettings

        token = await secrets.get_or_create(machine_token_key(LOCAL_MACHINE))
        # isolation, allow list and limits: the --local-* settings (LocalMachineSettings)
        agent = await start_agent(AgentSettings(host="127.0.0.1", port=0, token=token,
                                                work_dir=self.settings.data_dir / "agent",
                                                **self.settings.local.agent_values()))
        self._on_stop(agent.stop)
        ref = secret_ref(machine_token_key(LOCAL_MACHINE))
        self._local = (agent.url, ref)  # this process's executor sends `local` steps here, always
        registry = await store.read(key_filter("machine", LOCAL_MACHINE))
        current = registry[-1].event if registry else None
        if not isinstance(current, MachineRegistered) or current.url != agent.url or current.token_ref != ref:
            cls = MachineUpdated if isinstance(current, MachineRegistered) else MachineRegistered
            # shared with everyone until an admin says otherwise (PUT /api/machines/local sharedWith):
            # only admins declare what operators run, so a member's run can only run those
            owner, shared = (current.owner, current.shared_with) if current else ("serve", [EVERYONE])
            await store.append(cls(name=LOCAL_MACHINE, url=agent.url, labels={"builtin": "true"}, token_ref=ref,
                                   owner=owner, shared_with=shared), actor="serve")
        log.info("built-in machine 'local' ready", extra={"url": agent.url})

    async def _start_api(self, store: EventStore, blobs: FileBlobStore, secrets: SecretStore, serve_http: bool) -> None:
        from api.app import ApiRunner, create_app
        from api.context import ApiContext
        from projections.projector import Projector, open_db

        s = self.settings.api
        db = await open_db(self.settings.resolved_db_path)
        self._on_stop(db.close)
        projector = Projector(store, db)
        await self._host("projector", projector)
        if not serve_http:
            return
        # Serve only views that include everything appended before the start (the registry files
        # just declared, every run): a first GET must not see an empty or older state.
        head = await store.last_seq()
        if not await projector.wait_for(head, CATCH_UP_TIMEOUT):
            log.warning("serving before the projection caught up", extra={"head": head, "position": projector.position})
        token = s.api_token_file.read_text().strip() if s.api_token_file else None
        app = create_app(ApiContext(store=store, blobs=blobs, secrets=secrets, db=db, projector=projector,
                                    settings=s, api_token=token))
        runner = ApiRunner(app)
        await runner.setup()
        self._on_stop(runner.cleanup)
        site = web.TCPSite(runner, s.host, s.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else s.port  # the bound port when --port 0
        self.api_url = f"http://{s.host}:{port}"

    async def _start_executor(self, store: EventStore, blobs: FileBlobStore, secrets: SecretStore) -> None:
        from executors.machine import Machine, MachineBackend, MachineDirectory
        from executors.worker import StepWorker

        directory = MachineDirectory(store)
        await self._host("machines", directory)
        hosted = {LOCAL_MACHINE: Machine(LOCAL_MACHINE, *self._local)} if self._local else {}
        machines = MachineBackend(directory, secrets, blobs, hosted=hosted)
        self._on_stop(machines.close)
        backends: dict[str, Any] = {"machine": machines}
        kube = await self._kubernetes_backend(store, blobs, secrets)
        if kube is not None:
            backends["kubernetes"] = kube
        e = self.settings.executor
        worker = StepWorker(store, blobs, backends, concurrency=e.concurrency, ack_wait=e.ack_wait,
                            infra_retries=e.infra_retries, outcome_retry_for=e.outcome_retry_for,
                            update_consumer=e.update_consumer, workdir=self.settings.data_dir / "executor")
        await self._host("executor", worker)

    async def _kubernetes_backend(self, store: EventStore, blobs: FileBlobStore, secrets: SecretStore) -> Any:
        s = self.settings
        if not (s.kube.in_cluster or s.kube.config):
            return None
        from executors.kubernetes.backend import KubernetesBackend

        backend = await KubernetesBackend.create(s.kube, secrets, store, blobs)
        self._on_stop(backend.close)
        return backend

    async def _start_webhooks(self, store: EventStore, secrets: SecretStore) -> None:
        from integrations.webhooks import WebhookDispatcher

        from .webhooks import private_targets_allowed

        await self._host("webhooks", WebhookDispatcher(store, secrets, self.settings.webhook,
                                                       allow_private=private_targets_allowed(self.settings.api)))

    async def _start_metrics(self) -> None:
        """``/metrics`` on ``--metrics-host:--metrics-port`` (every role of this process shares the
        one registry, :mod:`mlynar_events.metrics`)."""
        from .metrics import start_server

        m = self.settings.metrics
        try:
            runner = await start_server(m.host, m.port)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {m.port}: cannot listen on {m.host}: {exc.strerror or exc}") from None
        self._on_stop(runner.cleanup)
        self.metrics_url = f"http://{m.host}:{m.port}/metrics"

    async def _start_crd_sync(self, store: EventStore) -> None:
        from executors.kubernetes.crd_sync import CrdSync

        sync = await CrdSync.create(self.settings.kube, store)
        self._on_stop(sync.close)
        await self._host("crd-sync", sync)

    async def stop(self) -> None:
        """Drain the roles and close what they used, newest first; safe to call twice."""
        await self._stack.aclose()
        log.info("mlynar stopped")


class ConfigError(Exception):
    """Settings that must not start (the CLI prints the message and exits 2)."""


MIN_TOKEN_CHARS = 16
"""Shortest API token accepted: an empty or guessable token file must not open the API."""


def _check_exposure(s: ServeSettings) -> None:
    """An API reachable beyond this machine needs a token, unless the operator says otherwise;
    a token file must hold a real token; the names the API answers for must parse."""
    if "api" in s.roles and not is_loopback(s.host) and s.api_token_file is None and not s.insecure_no_auth:
        raise ConfigError(
            f"refusing to serve the API on {s.host} without --api-token-file "
            "(pass --insecure-no-auth to do it anyway)")
    if s.api_token_file is not None:
        try:
            token = s.api_token_file.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"--api-token-file {s.api_token_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-token-file {s.api_token_file} cannot be read: {exc}") from None
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"--api-token-file {s.api_token_file} holds {'no' if not token else 'a too short'} "
                              f"token (at least {MIN_TOKEN_CHARS} characters; e.g. `openssl rand -hex 32`)")
    if "api" in s.roles:
        from api.door import Door

        try:
            Door.of(s.api)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


async def serve_forever(settings: ServeSettings, after_start: Callable[[Service], Awaitable[Any]] | None = None) -> int:
    """Run until SIGTERM/SIGINT (0) or a role fails (1). A signal during start-up (e.g. while
    NATS is still unreachable) cancels the start-up, which stops what it had started."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = Service(settings)
    starting = asyncio.ensure_future(service.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        log.info("stopped during start-up")
        return 0
    stopped.cancel()
    try:
        starting.result()  # a ConfigError propagates: the CLI prints it and exits 2
    except NatsUnavailable as exc:
        log.error("giving up: %s", exc)
        return 1
    try:
        if after_start is not None:
            asyncio.ensure_future(after_start(service))
        failed = asyncio.ensure_future(service.failed.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if service.failed.is_set():
            log.error("stopping: %s", service.failure)
            return 1
        return 0
    finally:
        await service.stop()
