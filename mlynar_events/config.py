"""The one place for configuration: every CLI flag has a ``MLYNAR_*`` environment variable of the
same name (``--nats-url`` <-> ``MLYNAR_NATS_URL``). A flag given on the command line wins over the
variable, which wins over the default.

Each command (``serve``, ``machine-agent``, ...) declares its flags with :func:`flag`, so the
variable name can never drift from the flag name.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

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


class ServeSettings(BaseModel):
    """Settings of ``mlynar serve``; every field is a flag (see :func:`add_serve_flags`)."""

    data_dir: Path = Path(".mlynar")
    nats_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 3000
    registry: list[Path] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=lambda: ["api", "projector", "solver", "executor"])
    blob_dir: Path | None = None
    db_path: Path | None = None
    max_upload_bytes: int = 4 * 1024**3
    max_json_bytes: int = 1024**2
    max_parallel: int = 8
    max_steps_per_run: int = 10_000
    executor_concurrency: int = 16
    executor_ack_wait: float = 30.0
    local_machine: bool = True
    api_token_file: Path | None = None
    insecure_no_auth: bool = False
    duplicate_window: float = 120.0
    stream_replicas: int = 1
    log_level: str = "INFO"
    log_format: str = "text"
    public_url: str | None = None
    # Kubernetes executor
    kube_namespace: str = "default"
    kube_config: Path | None = None
    kube_in_cluster: bool = False
    kube_storage_class: str | None = None
    kube_pvc_size: str = "1Gi"
    kube_wrapper_image: str = "mlynar-events:latest"
    kube_keep_failed_jobs: bool = False
    kube_watch_crds: bool = False
    kube_api_url: str = "http://mlynar-api:3000"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def resolved_db_path(self) -> Path:
        return self.db_path or self.data_dir / "projections.sqlite3"


def is_loopback(host: str) -> bool:
    import ipaddress

    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


ALL_ROLES = ("api", "projector", "solver", "executor", "crd-sync")


def _roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ALL_ROLES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown role(s) {unknown}; known: {list(ALL_ROLES)}")
    return roles


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    d = ServeSettings()
    flag(p, "--data-dir", default=d.data_dir, type=Path, help="where JetStream data, blobs, the projection database and secrets live")
    flag(p, "--nats-url", default=None, help="use this NATS server instead of starting the embedded one")
    flag(p, "--host", default=d.host, help="address the REST API listens on")
    flag(p, "--port", default=d.port, type=int, help="port of the REST API")
    flag(p, "--registry", type=Path, repeat=True, help="a YAML file or directory of DataKind/Operator documents to declare at start")
    flag(p, "--roles", default=d.roles, type=_roles, help="comma-separated roles this process hosts: api,projector,solver,executor,crd-sync")
    flag(p, "--blob-dir", default=None, type=Path, help="file blob store directory (default DATA_DIR/blobs)")
    flag(p, "--db-path", default=None, type=Path, help="projection SQLite file (default DATA_DIR/projections.sqlite3)")
    flag(p, "--max-upload-bytes", default=d.max_upload_bytes, type=int, help="largest accepted upload (413 above)")
    flag(p, "--max-json-bytes", default=d.max_json_bytes, type=int, help="largest accepted JSON body (413 above)")
    flag(p, "--max-parallel", default=d.max_parallel, type=int, help="default per-run limit of concurrently running steps")
    flag(p, "--max-steps-per-run", default=d.max_steps_per_run, type=int, help="a run that would schedule more steps is terminated")
    flag(p, "--executor-concurrency", default=d.executor_concurrency, type=int, help="steps one executor process runs at once")
    flag(p, "--executor-ack-wait", default=d.executor_ack_wait, type=float, help="seconds without a heartbeat before a step of a dead executor is redelivered")
    flag(p, "--local-machine", default=d.local_machine, boolean=True, help="start the built-in agent registered as machine 'local'")
    flag(p, "--api-token-file", default=None, type=Path, help="file holding the bearer token the REST API requires")
    flag(p, "--insecure-no-auth", default=False, boolean=True, help="allow a non-loopback --host without --api-token-file")
    flag(p, "--duplicate-window", default=d.duplicate_window, type=float, help="JetStream duplicate window in seconds")
    flag(p, "--stream-replicas", default=d.stream_replicas, type=int, help="replicas of the MLYNAR stream (3 in a cluster)")
    flag(p, "--log-level", default=d.log_level, help="DEBUG, INFO, WARNING, ERROR")
    flag(p, "--log-format", default=d.log_format, help="text or json")
    flag(p, "--public-url", default=None, help="base URL used in data unit 'url' fields (default: the request's own)")
    flag(p, "--kube-namespace", default=d.kube_namespace, help="namespace of step Jobs and watched CRDs")
    flag(p, "--kube-config", default=None, type=Path, help="kubeconfig file for the Kubernetes executor")
    flag(p, "--kube-in-cluster", default=False, boolean=True, help="use the pod's service account")
    flag(p, "--kube-storage-class", default=None, help="storage class of step PVCs")
    flag(p, "--kube-pvc-size", default=d.kube_pvc_size, help="size of step PVCs")
    flag(p, "--kube-wrapper-image", default=d.kube_wrapper_image, help="image running the download/upload wrapper")
    flag(p, "--kube-keep-failed-jobs", default=False, boolean=True, help="keep the Job and PVC of a failed step for inspection")
    flag(p, "--kube-watch-crds", default=False, boolean=True, help="(with role crd-sync) watch DataKind/Operator CRDs")
    flag(p, "--kube-api-url", default=d.kube_api_url, help="URL of the REST API as step Jobs' wrapper containers reach it")


def serve_settings(ns: argparse.Namespace) -> ServeSettings:
    values = {k: v for k, v in vars(resolve_repeats(ns)).items() if k in ServeSettings.model_fields}
    if values.get("registry") is None:
        values["registry"] = []
    return ServeSettings(**{k: v for k, v in values.items() if v is not None or k in {"nats_url"}})
