"""Secrets (machine tokens, the server's HMAC key) live here, never in an event: events carry a
reference (``secret:<key>``) that this store resolves.

The store is a JetStream KV bucket beside the event stream, so every role of every replica sees
the same secrets without a shared disk; a deleted secret is purged (no history kept).
"""

from __future__ import annotations

import re
import secrets as _random

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyDeletedError
from nats.js.kv import KeyValue

BUCKET = "mlynar-secrets"
_KEY = re.compile(r"^[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]+)*$")
PREFIX = "secret:"


def secret_key(ref_or_key: str) -> str:
    """The key of a reference ``secret:<key>`` (a bare key is taken as is); ValueError if invalid."""
    key = ref_or_key.removeprefix(PREFIX)
    if not _KEY.match(key):
        raise ValueError(f"invalid secret key {key!r}")
    return key


def secret_ref(key: str) -> str:
    """The reference events carry for the secret ``key``: ``secret:<key>``."""
    return PREFIX + secret_key(key)


def machine_token_key(machine: str) -> str:
    """Where a registered machine's bearer token is kept: ``machine.<name>``."""
    return f"machine.{machine}"


_key = secret_key


class SecretStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> "SecretStore":
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(bucket=BUCKET, history=1, replicas=replicas, description="mlynar secrets")
        return cls(kv)

    async def put(self, key: str, value: str) -> str:
        await self.kv.put(_key(key), value.encode())
        return secret_ref(key)

    async def get(self, ref: str) -> str | None:
        try:
            entry = await self.kv.get(_key(ref))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return entry.value.decode() if entry.value else None

    async def delete(self, ref: str) -> None:
        try:
            await self.kv.purge(_key(ref))
        except (KeyNotFoundError, KeyDeletedError):
            pass

    async def get_or_create(self, key: str, nbytes: int = 32) -> str:
        """The secret's value, generated on first use (e.g. the server's HMAC key). Two replicas
        racing both end with the value that landed first (``create`` fails if the key exists)."""
        existing = await self.get(key)
        if existing is not None:
            return existing
        value = _random.token_urlsafe(nbytes)
        try:
            await self.kv.create(_key(key), value.encode())
        except Exception:
            pass
        return (await self.get(key)) or value
