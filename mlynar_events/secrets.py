"""Secrets (machine tokens, the server's HMAC key) live here, never in an event: events carry a
reference (``secret:<key>``) that this store resolves.

The store is a JetStream KV bucket beside the event stream, so every role of every replica sees
the same secrets without a shared disk; a deleted secret is purged (no history kept).

Values are encrypted at rest (:class:`SecretCipher`, AES-256-GCM with the key's name as
associated data) with a key file that is not in NATS: the data directory's ``keys/secrets.key``
(0600) with the embedded server, or ``--secrets-key-file`` for every replica of a deployment. So
read access to NATS alone (a leaked NATS credential, a copy of the JetStream files) does not
reveal them, and a value cannot be moved to another key's name and still decrypt. Values written
in plaintext by an older version are still read, and re-encrypted when the store opens.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets as _random
import stat
from pathlib import Path
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, KeyDeletedError, NoKeysError
from nats.js.kv import KeyValue

from .store import retrying

OPEN_RETRY_FOR = 30.0

log = logging.getLogger("mlynar.secrets")

BUCKET = "mlynar-secrets"
_KEY = re.compile(r"^[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]+)*$")
PREFIX = "secret:"
SEALED = b"mlynar-aesgcm-v1:"
"""How an encrypted value starts (then base64 of nonce + ciphertext); anything else is an old
plaintext value."""


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


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), tightened if it exists and is
    ours. A shared directory (another owner's, or sticky like ``/tmp``) given by mistake is left
    as it is, with a warning: tightening it would break everyone else's use of it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & stat.S_ISVTX:
        if stat.S_IMODE(st.st_mode) & 0o077:
            log.warning("directory is shared: not making it private", extra={"path": str(path)})
        return path
    os.chmod(path, 0o700)
    return path


def ensure_private_file(path: Path, make: Callable[[], str]) -> str:
    """The stripped content of ``path``, created with ``make()`` (mode 0600, never through a
    moment of wider permissions) when it does not exist; an existing one is tightened to 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path.read_text().strip()
    value = make()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    return value


class SecretsLocked(Exception):
    """A value is encrypted and this process has no key (or the wrong one) to read it."""


class SecretCipher:
    """AES-256-GCM over secret values, bound to the key's name (associated data)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a secrets key is 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: Path, create: bool = False) -> "SecretCipher":
        """The key in ``path`` (base64 of 32 bytes, e.g. ``head -c32 /dev/urandom | base64``),
        generated (0600) first when ``create``; ValueError saying what is wrong with the file."""
        if create:
            text = ensure_private_file(path, lambda: base64.urlsafe_b64encode(os.urandom(32)).decode())
        else:
            text = path.read_text().strip()
            if path.stat().st_mode & 0o077:
                log.warning("secrets key file is readable by other users", extra={"path": str(path)})
        try:  # either base64 alphabet
            key = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        except ValueError:
            raise ValueError(f"secrets key file {path}: not base64") from None
        if len(key) != 32:
            raise ValueError(f"secrets key file {path}: holds {len(key)} bytes, needs 32")
        return cls(key)

    def seal(self, name: str, value: str) -> bytes:
        nonce = os.urandom(12)
        return SEALED + base64.b64encode(nonce + self._aead.encrypt(nonce, value.encode(), name.encode()))

    def open(self, name: str, stored: bytes) -> str:
        raw = base64.b64decode(stored[len(SEALED):])
        try:
            return self._aead.decrypt(raw[:12], raw[12:], name.encode()).decode()
        except InvalidTag:
            raise SecretsLocked(f"secret {name!r} does not decrypt with this secrets key "
                                "(another --secrets-key-file wrote it?)") from None


class SecretStore:
    """Secrets in the KV bucket; with a ``cipher`` written encrypted, without one in plaintext
    (an external NATS with no ``--secrets-key-file``: the wiring warns about it)."""

    def __init__(self, kv: KeyValue, cipher: SecretCipher | None = None) -> None:
        self.kv = kv
        self.cipher = cipher

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1, cipher: SecretCipher | None = None) -> "SecretStore":
        async def bucket() -> KeyValue:
            try:
                return await js.key_value(BUCKET)
            except BucketNotFoundError:
                pass
            try:
                return await js.create_key_value(bucket=BUCKET, history=1, replicas=replicas, description="mlynar secrets")
            except BadRequestError:  # another replica created it meanwhile
                return await js.key_value(BUCKET)

        # a cluster just started (or electing a leader) answers timeouts and 503s for a while
        kv = await retrying(bucket, "open the secrets bucket", OPEN_RETRY_FOR)
        store = cls(kv, cipher)
        if cipher is not None:
            await store.encrypt_plaintext()  # and checks the key opens what is sealed
        return store

    def _seal(self, key: str, value: str) -> bytes:
        return self.cipher.seal(key, value) if self.cipher is not None else value.encode()

    def _open(self, key: str, stored: bytes) -> str:
        if not stored.startswith(SEALED):
            return stored.decode()
        if self.cipher is None:
            raise SecretsLocked(f"secret {key!r} is encrypted and no --secrets-key-file is configured")
        return self.cipher.open(key, stored)

    async def encrypt_plaintext(self) -> int:
        """Re-encrypt every value an older version stored in plaintext (the upgrade of an
        existing data directory); a value changed meanwhile by another replica is left to it
        (the update is conditional on the revision read). Returns how many were encrypted.

        Sealed values are opened on the way: a key file that does not open them (another
        replica's, a regenerated one) raises :class:`SecretsLocked` here, at start, rather than
        at the first step that needs a machine token."""
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return 0
        upgraded = 0
        locked: list[str] = []
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                continue
            if entry.value and entry.value.startswith(SEALED):
                try:
                    self._open(key, entry.value)
                except SecretsLocked:
                    locked.append(key)
            elif entry.value and entry.revision is not None:
                try:
                    await self.kv.update(key, self._seal(key, entry.value.decode()), last=entry.revision)
                    upgraded += 1
                except Exception:  # noqa: BLE001 - another writer got there first: its value stands
                    log.debug("secret changed while encrypting it", extra={"key": key})
        if upgraded:
            log.info("encrypted secrets stored in plaintext by an older version", extra={"count": upgraded})
        if locked:
            raise SecretsLocked(f"{len(locked)} secret(s) in NATS ({', '.join(sorted(locked)[:3])}...) do not decrypt "
                                "with this secrets key: every replica needs the same --secrets-key-file")
        return upgraded

    async def put(self, key: str, value: str) -> str:
        await self.kv.put(_key(key), self._seal(_key(key), value))
        return secret_ref(key)

    async def get(self, ref: str) -> str | None:
        key = _key(ref)
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return self._open(key, entry.value) if entry.value else None

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
            await self.kv.create(_key(key), self._seal(_key(key), value))
        except Exception:
            pass
        return (await self.get(key)) or value
