"""The one place for configuration: every CLI flag has a ``MLYNAR_*`` environment variable of the
same name (``--nats-url`` <-> ``MLYNAR_NATS_URL``). A flag given on the command line wins over the
variable, which wins over the default.

Each command (``serve``, ``machine-agent``, ...) declares its flags with :func:`flag`, so the
variable name can never drift from the flag name.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "MLYNAR_"


def env_name(flag_name: str) -> str:
    """``--nats-url`` -> ``MLYNAR_NATS_URL``."""
    return ENV_PREFIX + flag_name.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def flag(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str,
    repeat: bool = False,
    boolean: bool = False,
) -> None:
    """Declare ``--name`` whose default comes from ``MLYNAR_NAME`` when that is set.

    A repeatable flag reads its variable as a comma-separated list (``MLYNAR_REGISTRY=a,b``)."""
    var = env_name(name)
    raw = os.environ.get(var)
    if boolean:
        value = _parse_bool(raw) if raw is not None else bool(default)
        parser.add_argument(
            name,
            action=argparse.BooleanOptionalAction,
            default=value,
            help=f"{help} [env {var}]",
        )
        return
    if repeat:
        value = [type(v) for v in raw.split(",") if v.strip()] if raw else list(default or [])
        parser.add_argument(
            name, action="append", type=type, default=None, help=f"{help} (repeatable) [env {var}]"
        )
        parser.set_defaults(**{_dest(name) + "__env": value})
        return
    value = type(raw) if raw is not None else default
    parser.add_argument(name, type=type, default=value, help=f"{help} [env {var}, default {default!r}]")


def _dest(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def resolve_repeats(ns: argparse.Namespace) -> argparse.Namespace:
    """Fill repeatable flags that were not given on the command line from their variable."""
    for key in [k for k in vars(ns) if k.endswith("__env")]:
        dest = key[: -len("__env")]
        if getattr(ns, dest, None) is None:
            setattr(ns, dest, getattr(ns, key))
        delattr(ns, key)
    return ns


class SettingsGroup(BaseModel):
    """The settings of one concern, and all its role is given (kopf's "settings per concern").

    A group is a view of :class:`ServeSettings`, which stays the one flat surface of flags and
    variables: field ``x`` of a group is the serve field ``FLAG_PREFIX + x``, so
    ``KubeSettings.namespace`` is ``--kube-namespace``. :meth:`of` builds the view; a test checks
    that every serve field belongs to exactly one group (or to :data:`PROCESS_FIELDS`)."""

    model_config = ConfigDict(frozen=True)
    FLAG_PREFIX: ClassVar[str] = ""

    @classmethod
    def of(cls, settings: "ServeSettings") -> Self:
        return cls(**{name: getattr(settings, cls.FLAG_PREFIX + name) for name in cls.model_fields})

    @classmethod
    def serve_fields(cls) -> set[str]:
        return {cls.FLAG_PREFIX + name for name in cls.model_fields}


class StoreSettings(SettingsGroup):
    """How every role reaches the event store (NATS JetStream)."""

    nats_url: str | None
    nats_user: str | None
    nats_password_file: Path | None
    nats_token_file: Path | None
    nats_creds: Path | None
    nats_nkey_seed: Path | None
    nats_tls_ca: Path | None
    nats_tls_cert: Path | None
    nats_tls_key: Path | None
    nats_connect_timeout: float
    secrets_key_file: Path | None
    duplicate_window: float
    stream_replicas: int

    def nats_options(self) -> "NatsOptions":
        """How to reach the external NATS of ``--nats-url`` (credential files read now); the
        embedded server's options are built by the wiring from the files it generated."""
        from .nats_connect import NatsOptions, read_secret_file

        assert self.nats_url, "only for an external NATS"
        return NatsOptions.from_url(
            self.nats_url, user=self.nats_user,
            password=read_secret_file(self.nats_password_file, "--nats-password-file") if self.nats_password_file else None,
            token=read_secret_file(self.nats_token_file, "--nats-token-file") if self.nats_token_file else None,
            creds=self.nats_creds, nkey_seed=self.nats_nkey_seed, tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert, tls_key=self.nats_tls_key, connect_timeout=self.nats_connect_timeout)


class ApiSettings(SettingsGroup):
    """The REST API's door and limits."""

    host: str
    port: int
    max_upload_bytes: int
    max_json_bytes: int
    max_parallel: int
    api_token_file: Path | None
    insecure_no_auth: bool
    public_url: str | None
    allowed_host: list[str]
    header_timeout: float
    body_timeout: float
    body_min_rate: int
    max_connections: int
    sse_heartbeat: float
    webhook_allow_private: bool
    webhook_rotation_grace: float


class SolverSettings(SettingsGroup):
    """Limits of the scheduling decisions."""

    max_steps_per_run: int


class ExecutorSettings(SettingsGroup):
    """How one executor process takes steps off the stream (``--executor-*``)."""

    FLAG_PREFIX: ClassVar[str] = "executor_"
    concurrency: int
    ack_wait: float
    infra_retries: int
    outcome_retry_for: float
    update_consumer: bool


class LocalMachineSettings(SettingsGroup):
    """How the built-in machine ``local`` runs steps (``--local-*``): the machine agent's own
    settings of the same names (``executors/agent/settings.py``, docs/AGENT.md), given to the
    agent ``serve`` starts. ``None`` leaves the agent's default; the defaults here keep the
    built-in machine as it was (no isolation, steps as the service's user) so that ``make run``
    and operators beside the registry files work; an operator of an exposed service sets them."""

    FLAG_PREFIX: ClassVar[str] = "local_"
    isolation: str
    run_as_user: str
    allow: list[str]
    read: list[Path]
    write: list[Path]
    network: bool
    limit_cpu_seconds: int | None
    limit_memory_bytes: int | None
    limit_processes: int | None
    limit_file_bytes: int | None

    def agent_values(self) -> dict[str, Any]:
        """The fields to give ``AgentSettings`` (unset limits left to the agent's defaults)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class KubeSettings(SettingsGroup):
    """What the Kubernetes executor and crd-sync need (``--kube-*``)."""

    FLAG_PREFIX: ClassVar[str] = "kube_"
    namespace: str
    config: Path | None
    in_cluster: bool
    storage_class: str | None
    pvc_size: str
    wrapper_image: str
    keep_failed_jobs: bool
    watch_crds: bool
    api_url: str
    watch_namespaces: str

    def crd_namespaces(self) -> list[str] | None:
        """The namespaces crd-sync watches (``--kube-watch-namespaces``, comma-separated; default
        the one of ``--kube-namespace``), or None for all of them (``*``): the original Mlynar's
        example resources pin ``metadata.namespace: default``, which need not be ours."""
        names = sorted({n.strip() for n in self.watch_namespaces.split(",") if n.strip()})
        if "*" in names:
            return None
        return names or [self.namespace]


class WebhookSettings(SettingsGroup):
    """How the webhook dispatcher delivers (``--webhook-*``). What the API decides when it
    accepts a webhook or rotates its secret (``webhook_allow_private``, ``webhook_rotation_grace``)
    is the API's; the dispatcher follows the events, and is given the SSRF rule by the wiring."""

    FLAG_PREFIX: ClassVar[str] = "webhook_"
    retry_base: float
    retry_cap: float
    max_failures: int
    timeout: float
    ack_wait: float
    patience: float
    lease_ttl: float


class MetricsSettings(SettingsGroup):
    """Where a process serves its Prometheus metrics besides the API's own ``/metrics``
    (``--metrics-*``; for processes without the API role): port 0 = not served."""

    FLAG_PREFIX: ClassVar[str] = "metrics_"
    host: str
    port: int


GROUPS: tuple[type[SettingsGroup], ...] = (StoreSettings, ApiSettings, SolverSettings, ExecutorSettings, LocalMachineSettings, KubeSettings,
                                           WebhookSettings, MetricsSettings)

PROCESS_FIELDS = frozenset({"data_dir", "registry", "roles", "blob_dir", "db_path", "local_machine", "log_level", "log_format"})
"""Serve fields that belong to the process wiring itself (``serve.py``), not to one role."""


class ServeSettings(BaseModel):
    """Settings of ``mlynar serve``. Every field is a flag and a variable (``--max-parallel``,
    ``MLYNAR_MAX_PARALLEL``), derived from the field by :func:`add_serve_flags`: its annotation
    gives the flag's type, its ``description`` the help. Roles are given one group each
    (:attr:`api`, :attr:`store`, :attr:`solver`, :attr:`executor`, :attr:`kube`, :attr:`webhook`,
    :attr:`metrics`)."""

    data_dir: Path = Field(Path(".mlynar"), description="where JetStream data, blobs, the projection database and secrets live")
    nats_url: str | None = Field(None, description="use this NATS server (or comma-separated servers of a cluster) instead of starting the embedded one")
    nats_user: str | None = Field(None, description="user name for --nats-url (with --nats-password-file)")
    nats_password_file: Path | None = Field(None, description="file holding the password of --nats-user")
    nats_token_file: Path | None = Field(None, description="file holding a NATS authentication token")
    nats_creds: Path | None = Field(None, description="NATS .creds file (user JWT and NKey seed) for --nats-url")
    nats_nkey_seed: Path | None = Field(None, description="file holding a NATS user NKey seed (SU...)")
    nats_tls_ca: Path | None = Field(None, description="CA bundle that signs the NATS servers' certificates")
    nats_tls_cert: Path | None = Field(None, description="client certificate for NATS TLS (with --nats-tls-key)")
    nats_tls_key: Path | None = Field(None, description="private key of --nats-tls-cert")
    nats_connect_timeout: float = Field(30.0, description="seconds start-up keeps retrying an unreachable NATS before it gives up")
    secrets_key_file: Path | None = Field(None, description="key file encrypting the secrets in NATS (default DATA_DIR/keys/secrets.key with the embedded NATS; give the same file to every replica)")
    host: str = Field("127.0.0.1", description="address the REST API listens on")
    port: int = Field(3000, description="port of the REST API")
    registry: list[Path] = Field(default_factory=list, description="a YAML file or directory of DataKind/Operator documents to declare at start")
    roles: list[str] = Field(default_factory=lambda: ["api", "projector", "solver", "executor", "webhooks"], description="comma-separated roles this process hosts: api,projector,solver,executor,webhooks,crd-sync")
    blob_dir: Path | None = Field(None, description="file blob store directory (default DATA_DIR/blobs)")
    db_path: Path | None = Field(None, description="projection SQLite file (default DATA_DIR/projections.sqlite3)")
    max_upload_bytes: int = Field(4 * 1024**3, description="largest accepted upload (413 above)")
    max_json_bytes: int = Field(1024**2, description="largest accepted JSON body (413 above)")
    max_parallel: int = Field(8, description="default per-run limit of concurrently running steps")
    max_steps_per_run: int = Field(10_000, description="a run that would schedule more steps is terminated")
    executor_concurrency: int = Field(16, description="steps one executor process runs at once")
    executor_ack_wait: float = Field(5.0, gt=0, description="seconds without a heartbeat before a step of a dead executor is redelivered (heartbeats every third of it); a new shared consumer gets it, an existing one keeps its own unless --executor-update-consumer")
    executor_infra_retries: int = Field(3, ge=0, description="attempts lost to the infrastructure (agent gone or restarted, blob store failing) retried beyond the operator's own retries")
    executor_outcome_retry_for: float = Field(60.0, gt=0, description="seconds storing an attempt's outputs is retried (a full or read-only blob disk) before the attempt counts as lost")
    executor_update_consumer: bool = Field(False, description="make the shared step consumer take this executor's --executor-ack-wait (otherwise the existing consumer's is used, with a warning)")
    local_machine: bool = Field(True, description="start the built-in agent registered as machine 'local'")
    local_isolation: Literal["auto", "bwrap", "none"] = Field("none", description="how the built-in machine isolates its steps: bwrap (a private view of the filesystem, see docs/AGENT.md), auto (bwrap if it works here), none")
    local_run_as_user: str = Field("", description="when serve runs as root, the built-in machine's steps run as this user ('' = as the service's user)")
    local_allow: list[str] = Field(default_factory=list, description="the built-in machine runs only commands matching one of these patterns (as the agent's --allow)")
    local_read: list[Path] = Field(default_factory=list, description="host path the built-in machine's isolated steps may read")
    local_write: list[Path] = Field(default_factory=list, description="host path the built-in machine's isolated steps may read and write")
    local_network: bool = Field(True, description="the built-in machine's steps may use the network (--no-local-network: isolated steps get only their own loopback, so not the API either)")
    local_limit_cpu_seconds: int | None = Field(None, description="CPU seconds per step process on the built-in machine (default: the agent's)")
    local_limit_memory_bytes: int | None = Field(None, description="memory per step process on the built-in machine (default: the agent's)")
    local_limit_processes: int | None = Field(None, description="processes of the built-in machine's steps' user (default: the agent's)")
    local_limit_file_bytes: int | None = Field(None, description="largest file a step on the built-in machine may write (default: the agent's)")
    api_token_file: Path | None = Field(None, description="file holding the bearer token the REST API requires")
    insecure_no_auth: bool = Field(False, description="allow a non-loopback --host without --api-token-file")
    duplicate_window: float = Field(120.0, description="JetStream duplicate window in seconds")
    stream_replicas: int = Field(1, description="replicas of the MLYNAR stream (3 in a cluster)")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_format: str = Field("text", description="text or json")
    public_url: str | None = Field(None, description="base URL used in data unit 'url' fields (default: the request's own)")
    allowed_host: list[str] = Field(default_factory=list, description="a further host name (or IP) the API answers for besides loopback names and --public-url's host, e.g. the Ingress name")
    header_timeout: float = Field(15.0, description="seconds a connection may take to send a complete request head (and may stay idle between requests)")
    body_timeout: float = Field(30.0, description="seconds of grace a request body gets before it must keep arriving at --body-min-rate (a slower client gets 408)")
    body_min_rate: int = Field(1024, description="bytes per second a request body must average after --body-timeout")
    max_connections: int = Field(512, description="open connections the API accepts at once (more are answered 503 and closed)")
    sse_heartbeat: float = Field(15.0, gt=0, description="seconds between keep-alive comments on an idle event stream (/api/events)")
    # webhooks
    webhook_allow_private: bool = Field(False, description="accept webhook targets on private, loopback or link-local addresses although the API is not loopback-only (give it to every API and webhooks replica)")
    webhook_retry_base: float = Field(1.0, description="seconds before the first retry of a failed webhook delivery (doubling each time)")
    webhook_retry_cap: float = Field(300.0, description="longest wait in seconds between retries of a webhook delivery")
    webhook_max_failures: int = Field(20, description="consecutive failed deliveries after which a webhook is marked failing and stops until re-enabled")
    webhook_timeout: float = Field(10.0, description="seconds one webhook POST may take")
    webhook_ack_wait: float = Field(30.0, description="seconds without a heartbeat before a delivery held by a dead dispatcher is taken over; the delivering replica applies its own to every webhook consumer, also existing ones")
    webhook_patience: float = Field(1.0, gt=0, description="seconds the shared webhook fan-out waits for one receiver before that webhook continues on its own consumer (a slow or failing receiver never holds the others)")
    webhook_lease_ttl: float = Field(10.0, ge=1, description="seconds after which a webhooks replica that stopped renewing its lease (killed, cut off) is replaced by a standby")
    webhook_rotation_grace: float = Field(86400.0, description="seconds the previous webhook secret still signs after a rotation")
    # metrics (docs/METRICS.md)
    metrics_host: str = Field("127.0.0.1", description="address --metrics-port listens on")
    metrics_port: int = Field(0, ge=0, le=65535, description="serve this process's Prometheus metrics at /metrics on this port, without authentication (for processes without the API, which has its own /metrics); 0: off")
    # Kubernetes executor
    kube_namespace: str = Field("default", description="namespace of step Jobs and watched CRDs")
    kube_config: Path | None = Field(None, description="kubeconfig file for the Kubernetes executor")
    kube_in_cluster: bool = Field(False, description="use the pod's service account")
    kube_storage_class: str | None = Field(None, description="storage class of step PVCs")
    kube_pvc_size: str = Field("1Gi", description="size of step PVCs")
    kube_wrapper_image: str = Field("mlynar-events:latest", description="image running the download/upload wrapper")
    kube_keep_failed_jobs: bool = Field(False, description="keep the Job and PVC of a failed step for inspection")
    kube_watch_crds: bool = Field(False, description="(with role crd-sync) watch DataKind/Operator CRDs")
    kube_api_url: str = Field("http://mlynar-api:3000", description="URL of the REST API as step Jobs' wrapper containers reach it")
    kube_watch_namespaces: str = Field("", description="namespaces whose DataKind/Operator resources crd-sync watches: comma-separated, or * for all (default: --kube-namespace)")

    @property
    def store(self) -> StoreSettings:
        return StoreSettings.of(self)

    @property
    def api(self) -> ApiSettings:
        return ApiSettings.of(self)

    @property
    def solver(self) -> SolverSettings:
        return SolverSettings.of(self)

    @property
    def executor(self) -> ExecutorSettings:
        return ExecutorSettings.of(self)

    @property
    def local(self) -> LocalMachineSettings:
        return LocalMachineSettings.of(self)

    @property
    def kube(self) -> KubeSettings:
        return KubeSettings.of(self)

    @property
    def webhook(self) -> WebhookSettings:
        return WebhookSettings.of(self)

    @property
    def metrics(self) -> MetricsSettings:
        return MetricsSettings.of(self)

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def resolved_db_path(self) -> Path:
        return self.db_path or self.data_dir / "projections.sqlite3"


from .netaddr import is_loopback  # noqa: E402,F401  (one rule; serve imports it from here)


ALL_ROLES = ("api", "projector", "solver", "executor", "webhooks", "crd-sync")


def _roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ALL_ROLES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown role(s) {unknown}; known: {list(ALL_ROLES)}")
    return roles


PARSERS: dict[str, Callable[[str], Any]] = {"roles": _roles}
"""Fields whose flag needs more than its annotation's type to parse its text."""


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    """The parser of a ``Literal`` field's flag: one of its values, or a usage error naming them."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _flag_type(annotation: Any) -> tuple[Callable[[str], Any], bool, bool]:
    """(parser of one value, repeatable, boolean) for a field's annotation: ``X | None`` is X,
    ``list[X]`` repeats, ``bool`` is ``--x/--no-x``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return str, False, True
    if typing.get_origin(annotation) is Literal:
        return _choice(typing.get_args(annotation)), False, False
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True, False
    return annotation, False, False


def add_model_flags(p: argparse.ArgumentParser, model: type[BaseModel], *, skip: tuple[str, ...] = (),
                    parsers: dict[str, Callable[[str], Any]] | None = None) -> None:
    """One flag per field of ``model`` (except ``skip``), declared from the field itself: the
    name (``max_parallel`` -> ``--max-parallel``, ``MLYNAR_MAX_PARALLEL``), the type from the
    annotation (``parsers`` for fields that need more), the help from ``description``."""
    parsers = parsers or {}
    defaults = model()
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        parse, repeat, boolean = _flag_type(field.annotation)
        default = getattr(defaults, name)
        flag(p, "--" + name.replace("_", "-"), default=None if repeat and not default else default,
             type=parsers.get(name, parse), help=field.description or "", repeat=repeat and name not in parsers,
             boolean=boolean)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``mlynar serve`` (and ``projections rebuild``): the fields of ServeSettings."""
    add_model_flags(p, ServeSettings, parsers=PARSERS)


def serve_settings(ns: argparse.Namespace) -> ServeSettings:
    values = {k: v for k, v in vars(resolve_repeats(ns)).items() if k in ServeSettings.model_fields}
    if values.get("registry") is None:
        values["registry"] = []
    return ServeSettings(**{k: v for k, v in values.items() if v is not None or k in {"nats_url"}})
