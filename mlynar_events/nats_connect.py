"""The one way a process connects to NATS: which servers, with which credentials and TLS, and how
start-up waits for a server that is not there yet.

Why this is its own module: every role (and ``projections rebuild``) must connect the same way, so
a cluster's server list, the embedded server's generated password or an external cluster's
``.creds`` file are given once (:class:`NatsOptions`) and honoured everywhere.

Start-up against an unreachable NATS retries with a bounded, growing backoff, one log line per
attempt and no traceback, until ``connect_timeout`` seconds have passed; it is a plain coroutine,
so cancelling it (SIGTERM during start-up) stops it at once. Credentials that the server refuses
(or a server certificate that does not verify) are not retried: waiting cannot make them right. Once connected, the client reconnects forever on
its own (a restarted embedded server, a cluster node going away), logging the disconnection and
the reconnection once each rather than every attempt.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import AuthorizationError
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("mlynar.nats")

ATTEMPT_TIMEOUT = 2.0
"""Seconds one connection attempt to one server may take (TCP, INFO, CONNECT)."""
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 5.0
DEFAULT_CONNECT_TIMEOUT = 30.0


class NatsUnavailable(Exception):
    """Start-up could not connect (unreachable until the deadline, or credentials refused); the
    message says which and is meant for the operator as is."""


class NatsOptions(BaseModel):
    """Where NATS is and how to prove who we are. Secret values are held here already read from
    their files, so a connection (or a reconnection) never reads a file an operator rotated
    halfway."""

    model_config = ConfigDict(frozen=True)

    servers: list[str] = Field(min_length=1)
    user: str | None = None
    password: str | None = Field(None, repr=False)
    token: str | None = Field(None, repr=False)
    creds: Path | None = None
    nkey_seed: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> "NatsOptions":
        if (self.user is None) != (self.password is None):
            raise ValueError("a NATS user needs a password and a password needs a user")
        ways = [w for w, given in (("user/password", self.user is not None), ("token", self.token is not None),
                                   ("creds", self.creds is not None), ("nkey seed", self.nkey_seed is not None))
                if given]
        if len(ways) > 1:
            raise ValueError(f"give one way to authenticate to NATS, not {' and '.join(ways)}")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("a TLS key needs its certificate (--nats-tls-cert)")
        return self

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "NatsOptions":
        """``url`` may be a comma-separated list of servers (a cluster's seed nodes)."""
        return cls(servers=split_servers(url), **kwargs)

    def tls_context(self) -> ssl.SSLContext | None:
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """The authentication and TLS arguments of ``nats.connect``."""
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs.update(user=self.user, password=self.password)
        if self.token is not None:
            kwargs["token"] = self.token
        if self.creds is not None:
            kwargs["user_credentials"] = str(self.creds)
        if self.nkey_seed is not None:
            kwargs["nkeys_seed"] = str(self.nkey_seed)
        tls = self.tls_context()
        if tls is not None:
            kwargs["tls"] = tls
        return kwargs


def split_servers(url: str) -> list[str]:
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


def read_secret_file(path: Path, what: str) -> str:
    """The stripped content of a credential file; ValueError naming the flag when it cannot be
    read or is empty."""
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not value:
        raise ValueError(f"{what} {path} is empty")
    return value


class _AttemptFailed(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Callbacks:
    """The client's callbacks: during an attempt, the first failure of the last server ends the
    attempt (so our loop, not the client's, decides the backoff and the deadline); once
    connected, disconnections and reconnections are logged once each."""

    def __init__(self, nc: NATS, servers: int, name: str) -> None:
        self.nc = nc
        self.servers = servers
        self.name = name
        self.connected = False
        self.failures: list[BaseException] = []
        self.disconnected = False

    async def error(self, exc: Exception) -> None:
        if not self.connected:
            self.failures.append(exc)
            if _is_refusal(exc) or isinstance(exc, ssl.SSLCertVerificationError) or len(self.failures) >= self.servers:
                raise _AttemptFailed(exc)
            return
        level = logging.DEBUG if self.disconnected else logging.WARNING
        log.log(level, "NATS connection error", extra={"connection": self.name, "error": _describe(exc)})

    async def on_disconnected(self) -> None:
        if self.connected and not self.disconnected and not (self.nc.is_closed or self.nc.is_draining):
            self.disconnected = True
            log.warning("NATS disconnected; reconnecting", extra={"connection": self.name})

    async def on_reconnected(self) -> None:
        if self.disconnected:
            self.disconnected = False
            log.info("NATS reconnected", extra={"connection": self.name})


def _is_refusal(exc: BaseException) -> bool:
    """The server refused who we are (the client reports it as ``AuthorizationError`` or as a
    protocol error with the server's text)."""
    return isinstance(exc, AuthorizationError) or "authorization violation" in str(exc).lower()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def connect(target: str | NatsOptions, *, name: str = "mlynar") -> NATS:
    """A connected client, or :class:`NatsUnavailable` after ``connect_timeout`` seconds (at once
    when the server refuses the credentials). ``target`` is options or a server list."""
    options = target if isinstance(target, NatsOptions) else NatsOptions.from_url(target)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.connect_timeout
    backoff = FIRST_BACKOFF
    attempt = 0
    kwargs = options.client_kwargs()
    while True:
        attempt += 1
        nc = NATS()
        callbacks = _Callbacks(nc, len(options.servers), name)
        try:
            await nc.connect(
                servers=options.servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                connect_timeout=max(0.1, min(ATTEMPT_TIMEOUT, deadline - loop.time())),
                error_cb=callbacks.error, disconnected_cb=callbacks.on_disconnected,
                reconnected_cb=callbacks.on_reconnected, **kwargs)
            callbacks.connected = True
            log.info("connected to NATS", extra={"connection": name, "server": _server(nc), "attempts": attempt})
            return nc
        except _AttemptFailed as failed:
            cause: BaseException = failed.cause
        except (OSError, asyncio.TimeoutError) as exc:
            cause = exc
        finally:
            if not callbacks.connected:
                await _discard(nc)
        if _is_refusal(cause):
            raise NatsUnavailable(f"NATS at {', '.join(options.servers)} refused our credentials "
                                  f"({_describe(cause)}): check the --nats-* credential flags") from None
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise NatsUnavailable(f"NATS at {', '.join(options.servers)}: the server's TLS certificate does not "
                                  f"verify ({_describe(cause)}): check --nats-tls-ca") from None
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise NatsUnavailable(f"NATS at {', '.join(options.servers)} not reachable within "
                                  f"{options.connect_timeout:g}s ({attempt} attempts; last: {_describe(cause)})") from None
        wait = min(backoff, remaining)
        log.warning("NATS not reachable yet, retrying", extra={
            "connection": name, "servers": ",".join(options.servers), "attempt": attempt,
            "error": _describe(cause), "retry_in": round(wait, 2), "gives_up_in": round(remaining, 1)})
        await asyncio.sleep(wait)
        backoff = min(backoff * 2, MAX_BACKOFF)


def _server(nc: NATS) -> str:
    url = nc.connected_url
    return f"{url.hostname}:{url.port}" if url is not None else "?"


async def _discard(nc: NATS) -> None:
    """Close a client whose attempt failed, never raising and never waiting long (its state is
    half-built: a transport whose TLS handshake failed may never report itself closed)."""
    try:
        await asyncio.wait_for(nc.close(), 1.0)
    except Exception:  # noqa: BLE001 - nothing to keep from a failed attempt
        transport = getattr(nc, "_transport", None)
        if transport is not None:
            try:
                transport.close()
            except Exception:  # noqa: BLE001
                pass
