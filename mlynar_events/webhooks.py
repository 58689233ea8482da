"""The rules of webhooks that the API (which accepts a subscription) and the dispatcher (which
delivers to it) must apply alike, so they live here, once:

* **what a subscription receives**: :func:`delivery_filters` turns ``types``/``runs`` into the
  JetStream subject filters of the webhook's durable consumer; the API calls it to refuse a
  subscription that can match nothing before anything is written;
* **where it may send (SSRF)**: :func:`check_url` (http(s), a host, no credentials, no fragment)
  and :func:`check_target`, which resolves the host and refuses private, loopback, link-local
  and other non-global addresses unless :func:`private_targets_allowed`. The API checks at
  creation, the dispatcher again before every attempt (DNS may have changed since), and its
  HTTP client connects only to addresses that passed (:class:`GuardedResolver`), so a name that
  re-resolves between the check and the connection cannot slip through;
* **how a delivery is signed** (Standard Webhooks): :func:`new_secret`, :func:`signature`;
* **what a delivery attempt records**: :class:`DeliveryAttempt`, kept per webhook as a JSON
  list of the last :data:`KEPT_DELIVERIES` in the KV bucket :data:`DELIVERIES_BUCKET`. The
  dispatcher writes it and the API reads it: roles meet on NATS, never by calling each other.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import ipaddress
import re
import secrets as _random
import socket
import uuid
from datetime import datetime
from typing import Iterable
from urllib.parse import urlsplit

from aiohttp.abc import ResolveResult
from aiohttp.resolver import DefaultResolver
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, TypeAdapter

from .config import ApiSettings
from .events import CATALOGUE, SUBJECT_PREFIX, key_filter, subject_filters
from .netaddr import is_loopback

DELIVERIES_BUCKET = "mlynar-webhook-deliveries"
KEPT_DELIVERIES = 50
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MAX_RUNS = 100
RESOLVE_TIMEOUT = 5.0
"""Seconds a target's name may take to resolve (a creation request waits for it)."""
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class WebhookRuleError(ValueError):
    """A subscription or target this service refuses; the message says why (the API's 400)."""


class TargetRefused(WebhookRuleError):
    """The target URL is not one this service may send to."""


def new_webhook_id() -> str:
    """Random, and a safe subject token and consumer name (no dots, no wildcards)."""
    return uuid.uuid4().hex


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes it: ``whsec_`` + base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(SECRET_BYTES)).decode()


def new_secret_key(webhook_id: str) -> str:
    """A fresh key in the secret store for one of the webhook's secrets: each rotation gets its
    own, so the previous one can keep signing through the grace period."""
    return f"webhook.{webhook_id}.{uuid.uuid4().hex[:12]}"


def consumer_name(webhook_id: str) -> str:
    """The webhook's own durable JetStream consumer (while it is detached from the fan-out)."""
    return f"webhook-{webhook_id}"


FANOUT_CONSUMER = "webhooks-fanout"
"""The durable consumer of every event that the dispatcher fans out to the attached webhooks."""
FANOUT_BUCKET = "mlynar-webhook-fanout"
"""KV bucket with one key, :data:`ATTACHED_KEY`: which webhooks the fan-out delivers."""
ATTACHED_KEY = "attached"


def subject_matches(subject: str, filters: Iterable[str]) -> bool:
    """Whether ``subject`` matches one of the JetStream ``filters`` (``*`` one token, ``>`` the
    rest): what a webhook's own consumer would deliver, decided in process for the fan-out."""
    tokens = subject.split(".")
    for pattern in filters:
        parts = pattern.split(".")
        for i, part in enumerate(parts):
            if part == ">":
                if len(tokens) > i:
                    return True
                break
            if i >= len(tokens) or (part != "*" and part != tokens[i]):
                break
        else:
            if len(parts) == len(tokens):
                return True
    return False


def _covers(wide: str, narrow: str) -> bool:
    """Every subject ``narrow`` matches, ``wide`` matches too (both JetStream filters)."""
    w, n = wide.split("."), narrow.split(".")
    for i, part in enumerate(w):
        if part == ">":
            return i < len(n)
        if i >= len(n) or n[i] == ">" or (part != "*" and (n[i] == "*" or part != n[i])):
            return False
    return len(w) == len(n)


def _overlap(a: str, b: str) -> bool:
    """Some subject matches both filters."""
    x, y = a.split("."), b.split(".")
    for i in range(min(len(x), len(y))):
        if x[i] == ">" or y[i] == ">":
            return True
        if x[i] != "*" and y[i] != "*" and x[i] != y[i]:
            return False
    return len(x) == len(y)


def fanout_filters(filter_sets: Iterable[Iterable[str]]) -> list[str] | None:
    """The fan-out consumer's subject filters for webhooks with these ``filter_sets``: their
    union, without the filters another one covers, so that the server hands the fan-out only
    events some attached webhook wants. None (the whole stream) when two that remain overlap
    (JetStream refuses overlapping filters, and the only union of those is a wider one)."""
    union = sorted({f for filters in filter_sets for f in filters})
    kept = [f for f in union if not any(g != f and _covers(g, f) for g in union)]
    if any(_overlap(a, b) for i, a in enumerate(kept) for b in kept[i + 1:]):
        return None
    return kept


# ---- what a subscription receives --------------------------------------------------------------


def delivery_filters(types: Iterable[str], runs: Iterable[str]) -> list[str]:
    """The subject filters of a subscription: ``types`` (catalogue names, empty = every type) and
    ``runs`` (run ids, empty = every aggregate; given = only those runs' events). The filters
    never overlap (JetStream refuses overlapping ones). WebhookRuleError for unknown types, bad
    run ids, or types that no event of the given runs can have."""
    types, runs = sorted(set(types)), sorted(set(runs))
    unknown = [t for t in types if t not in CATALOGUE]
    if unknown:
        raise WebhookRuleError(f"unknown event type(s) {unknown}; known: {sorted(CATALOGUE)}")
    bad = [r for r in runs if not _RUN_ID.match(r)]
    if bad:
        raise WebhookRuleError(f"invalid run id(s) {bad[:5]} (letters, digits, '-' and '_' only)")
    if len(runs) > MAX_RUNS:
        raise WebhookRuleError(f"at most {MAX_RUNS} runs per webhook, got {len(runs)}")
    classes = [CATALOGUE[t] for t in types]
    if not runs:
        return subject_filters(classes or CATALOGUE.values())
    not_run = [c.event_type for c in classes if c.aggregate != "run"]
    if not_run:
        raise WebhookRuleError(f"{not_run} are not run events: a webhook with 'runs' receives only those runs' events")
    if not classes:
        return [key_filter("run", r) for r in runs]
    return [f"{SUBJECT_PREFIX}.run.{r}.{c.event_type}" for r in runs for c in classes]


# ---- where it may send (SSRF) ------------------------------------------------------------------


def private_targets_allowed(api: ApiSettings) -> bool:
    """Targets on private/loopback/link-local addresses are fine when the API itself is
    loopback-only (whoever can create a webhook can reach those addresses anyway), and
    otherwise only when the operator says so (``--webhook-allow-private``)."""
    return api.webhook_allow_private or is_loopback(api.host)


@functools.lru_cache(maxsize=4096)
def check_url(url: str) -> tuple[str, int]:
    """(host, port) of an acceptable target URL: http(s), a host, no user info, no fragment.
    Cached: it is judged again before every delivery (with the host's addresses, which can change;
    the URL cannot), and a refusal (raised) is not cached."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"url is not a valid URL: {exc}") from None
    if parts.scheme not in {"http", "https"}:
        raise TargetRefused(f"url must be http or https, not {parts.scheme or 'nothing'!r}")
    if not parts.hostname:
        raise TargetRefused("url has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("url must not carry credentials (user:password@); authenticate by the signature")
    if parts.fragment or url.endswith("#"):
        raise TargetRefused("url must not have a fragment")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def is_public(address: str) -> bool:
    """A globally routable unicast address (an IPv4-mapped IPv6 address is judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _refuse_private(host: str, addresses: Iterable[str]) -> None:
    private = sorted({a for a in addresses if not is_public(a)})
    if private:
        raise TargetRefused(
            f"url's host {host!r} is a private, loopback or link-local address ({', '.join(private)}); "
            "allowed only when the API listens on loopback or with --webhook-allow-private")


async def check_target(url: str, allow_private: bool) -> None:
    """TargetRefused unless ``url`` passes :func:`check_url` and, unless ``allow_private``,
    every address its host resolves to is public. A host that does not resolve is refused too."""
    host, port = check_url(url)
    if allow_private:
        return
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise TargetRefused(f"url's host {host!r} did not resolve within {RESOLVE_TIMEOUT:g}s") from None
    except (OSError, UnicodeError) as exc:
        raise TargetRefused(f"url's host {host!r} does not resolve: {exc}") from None
    _refuse_private(host, (info[4][0] for info in infos))


class GuardedResolver(DefaultResolver):
    """aiohttp's resolver that refuses (unless ``allow_private``) a name resolving to a
    non-public address, so the addresses connected to are the ones checked. (IP literals never
    reach a resolver: :func:`check_target` judges those.)"""

    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await super().resolve(host, port, family)
        if not self.allow_private:
            _refuse_private(host, (r["host"] for r in results))
        return results


# ---- how a delivery is signed, and what an attempt records -------------------------------------


def signature(secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``
    per secret (the key is the base64-decoded part after ``whsec_``), space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(_signing_key(secret), signed, hashlib.sha256).digest()).decode()
                    for secret in secrets)


@functools.lru_cache(maxsize=1024)
def _signing_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


class DeliveryAttempt(BaseModel):
    """One POST of one event to a webhook (the API's ``/deliveries`` answer, newest last)."""

    model_config = ConfigDict(frozen=True)
    eventId: str
    type: str
    sequence: int
    attempt: int
    statusCode: int | None
    latencyMs: float
    error: str | None
    at: datetime


_ATTEMPTS = TypeAdapter(list[DeliveryAttempt])


async def deliveries_bucket(js: JetStreamContext, replicas: int = 1, create: bool = True) -> KeyValue | None:
    """The KV bucket of delivery records (created by the dispatcher; ``None`` for a reader when
    no dispatcher ever made it)."""
    try:
        return await js.key_value(DELIVERIES_BUCKET)
    except BucketNotFoundError:
        if not create:
            return None
        return await js.create_key_value(bucket=DELIVERIES_BUCKET, history=1, replicas=replicas,
                                         description="the last delivery attempts of each webhook")


async def fanout_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """The KV bucket of the fan-out's record (which webhooks it serves); the dispatcher's alone."""
    try:
        return await js.key_value(FANOUT_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=FANOUT_BUCKET, history=1, replicas=replicas,
                                         description="which webhooks the shared fan-out delivers")


async def read_deliveries(kv: KeyValue | None, webhook_id: str) -> list[DeliveryAttempt]:
    """The webhook's recorded attempts, oldest first (empty when there are none)."""
    if kv is None:
        return []
    try:
        entry = await kv.get(webhook_id)
    except (KeyNotFoundError, KeyDeletedError):
        return []
    return _ATTEMPTS.validate_json(entry.value) if entry.value else []


def deliveries_json(attempts: Iterable[DeliveryAttempt]) -> bytes:
    return _ATTEMPTS.dump_json(list(attempts))
