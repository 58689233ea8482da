"""The engine room (NATS) is locked: the embedded nats-server refuses clients without the
generated NKey (no credentials, a wrong password, another NKey), secrets in the KV bucket are
encrypted at rest (an older data directory's plaintext ones are re-encrypted), the data directory
and what is secret in it are the owner's only, and ``--nats-url`` reaches an external cluster by a
server list with user/password, token or NKey credentials over TLS. Real nats-server processes
throughout; the service is the real in-process ``Service``."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import stat
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import nkeys
import pytest

from mlynar_events.nats_connect import NatsOptions, NatsUnavailable, connect
from mlynar_events.nats_server import EmbeddedNats, free_port, nats_server_binary
from mlynar_events.secrets import BUCKET, SEALED, SecretCipher, SecretsLocked, SecretStore, machine_token_key
from mlynar_events.serve import ConfigError, Service
from mlynar_events.store import EventStore

from support import service_settings, wait_until


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Service]:
    """A whole service on its own embedded nats-server (no ``--nats-url``)."""
    service = Service(service_settings(tmp_path, None))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def _refused(options: NatsOptions) -> str:
    with pytest.raises(NatsUnavailable) as caught:
        await connect(options)
    return str(caught.value)


async def test_embedded_nats_refuses_clients_without_its_nkey(embedded: Service, tmp_path: Path) -> None:
    assert embedded.nats is not None
    url = embedded.nats.url
    fast = dict(servers=[url], connect_timeout=5)
    # no credentials at all, a user with a wrong password, a token, and an NKey of our own
    assert "refused our credentials" in await _refused(NatsOptions(**fast))
    assert "refused our credentials" in await _refused(NatsOptions(**fast, user="mlynar", password="wrong"))
    assert "refused our credentials" in await _refused(NatsOptions(**fast, token="guess"))
    other = tmp_path / "other.nk"
    other.write_text(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())
    assert "refused our credentials" in await _refused(NatsOptions(**fast, nkey_seed=other))
    # and the service itself is connected with the generated one
    seed = embedded.settings.data_dir / "keys" / "nats-user.nk"
    nc = await connect(NatsOptions(**fast, nkey_seed=seed))
    try:
        assert nc.is_connected
    finally:
        await nc.close()
    # the server's configuration holds the public key only, never the seed
    config = (embedded.settings.data_dir / "keys" / "nats-server.conf").read_text()
    assert seed.read_text().strip() not in config and "nkey" in config


async def test_secrets_are_encrypted_at_rest(embedded: Service) -> None:
    keys = embedded.settings.data_dir / "keys"
    options = NatsOptions(servers=[embedded.nats.url], nkey_seed=keys / "nats-user.nk")  # type: ignore[union-attr]
    store = await EventStore.connect(options)
    try:
        raw = await (await store.js.key_value(BUCKET)).get(machine_token_key("local"))
        assert raw.value is not None and raw.value.startswith(SEALED)
        # what the built-in agent accepts, read with the key file only the service has
        cipher = SecretCipher.from_file(keys / "secrets.key")
        token = await SecretStore(await store.js.key_value(BUCKET), cipher).get(machine_token_key("local"))
        assert token and token.encode() not in raw.value
        # read access to NATS alone (no key file) does not reveal it
        with pytest.raises(SecretsLocked):
            await SecretStore(await store.js.key_value(BUCKET)).get(machine_token_key("local"))
        # a value moved under another key's name does not decrypt (the name is authenticated)
        kv = await store.js.key_value(BUCKET)
        await kv.put("machine.moved", raw.value)
        with pytest.raises(SecretsLocked):
            await SecretStore(kv, cipher).get("machine.moved")
        # nor with another key file
        with pytest.raises(SecretsLocked):
            await SecretStore(kv, SecretCipher(os.urandom(32))).get(machine_token_key("local"))
    finally:
        await store.close()


async def test_an_older_data_dir_is_upgraded(tmp_path: Path) -> None:
    """A data directory of the previous version: a world-readable layout, an unauthenticated
    JetStream with plaintext secrets. Starting on it locks the server, tightens the files and
    re-encrypts the secrets, keeping their values."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    old = EmbeddedNats(data / "nats")
    url = await old.start()
    store = await EventStore.connect(url)
    plain = await SecretStore.open(store.js)
    await plain.put(machine_token_key("local"), "old-local-token-0123456789")
    await plain.put("server.hmac", "old-hmac-key-0123456789")
    await store.close()
    await old.stop()
    os.chmod(data / "nats", 0o755)
    db = data / "projections.sqlite3"
    db.touch()
    os.chmod(db, 0o644)

    service = Service(service_settings(tmp_path, None))
    await service.start()
    try:
        options = NatsOptions(servers=[service.nats.url], nkey_seed=data / "keys" / "nats-user.nk")  # type: ignore[union-attr]
        store = await EventStore.connect(options)
        try:
            kv = await store.js.key_value(BUCKET)
            for key, value in ((machine_token_key("local"), "old-local-token-0123456789"),
                               ("server.hmac", "old-hmac-key-0123456789")):
                raw = (await kv.get(key)).value
                assert raw is not None and raw.startswith(SEALED) and value.encode() not in raw
            cipher = SecretCipher.from_file(data / "keys" / "secrets.key")
            assert await SecretStore(kv, cipher).get(machine_token_key("local")) == "old-local-token-0123456789"
        finally:
            await store.close()
        assert "refused" in await _refused(NatsOptions(servers=[service.nats.url], connect_timeout=3))  # type: ignore[union-attr]
        assert _mode(data) == 0o700 and _mode(data / "nats") == 0o700 and _mode(db) == 0o600
    finally:
        await service.stop()


async def test_data_dir_blobs_db_and_keys_are_the_owners_only(tmp_path: Path) -> None:
    blobs = tmp_path / "shared-blobs"  # a blob directory outside the data directory, too
    service = Service(service_settings(tmp_path, None, blob_dir=blobs))
    await service.start()
    try:
        data = service.settings.data_dir
        async with aiohttp.ClientSession(service.api_url) as http:
            async with http.post("/api/run") as r:
                run_id = (await r.json())["id"]
            form = aiohttp.FormData()
            form.add_field("file", b"[1,2,3]", filename="n.json", content_type="application/octet-stream")
            async with http.post(f"/api/run/{run_id}/upload/number-array-json", data=form) as r:
                assert r.status == 201, await r.text()
        for directory in (data, data / "keys", data / "nats", blobs):
            assert _mode(directory) == 0o700, directory
        for secret in ("nats-user.nk", "secrets.key", "nats-server.conf"):
            assert _mode(data / "keys" / secret) == 0o600, secret
        assert _mode(data / "projections.sqlite3") == 0o600
        assert _mode(data / "lock") == 0o600
    finally:
        await service.stop()


# ---- an external cluster: server lists, credentials, TLS ----------------------------------------


class ConfiguredNats:
    """A nats-server with a configuration of the test's own (users, tokens, TLS)."""

    def __init__(self, tmp: Path, name: str, config: str) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.dir = tmp / name
        self.dir.mkdir()
        self.config = self.dir / "server.conf"
        self.config.write_text(config)
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> "ConfiguredNats":
        self.proc = await asyncio.create_subprocess_exec(
            nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir / "js"),
            "-c", str(self.config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

        async def listening() -> bool:
            assert self.proc is not None and self.proc.returncode is None, "nats-server exited"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(listening, 15, what="nats-server to listen")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        await self.proc.wait()


def _tls_material(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlynar test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, who)])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[who] = tmp / f"{who}.pem"
        out[who].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}-key"] = tmp / f"{who}-key.pem"
        out[f"{who}-key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return out


async def test_external_cluster_over_tls_with_a_password_and_a_server_list(tmp_path: Path) -> None:
    """``--nats-url`` with a dead seed node first, ``--nats-user``/``--nats-password-file``, the
    CA and a client certificate: the service starts and its secrets are encrypted with
    ``--secrets-key-file``; without the client certificate or with a wrong password it is refused."""
    pem = _tls_material(tmp_path)
    config = (f'tls {{\n cert_file: "{pem["server"]}"\n key_file: "{pem["server-key"]}"\n'
              f' ca_file: "{pem["ca"]}"\n verify: true\n}}\n'
              'authorization {\n user: "svc"\n password: "s3cret-pass-0123456789"\n}\n')
    async with ConfiguredNats(tmp_path, "tls-nats", config) as server:
        password = tmp_path / "nats-password"
        password.write_text("s3cret-pass-0123456789\n")
        key_file = tmp_path / "secrets.key"
        key_file.write_text("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n")  # 32 bytes, base64
        dead = f"nats://127.0.0.1:{free_port()}"
        tls = dict(nats_tls_ca=pem["ca"], nats_tls_cert=pem["client"], nats_tls_key=pem["client-key"])
        settings = service_settings(tmp_path, f"{dead},{server.url}", nats_user="svc", nats_password_file=password,
                                    secrets_key_file=key_file, nats_connect_timeout=10, **tls)
        service = Service(settings)
        await service.start()
        try:
            assert service.store is not None and service.store.nc.is_connected
            store = service.store
            raw = (await (await store.js.key_value(BUCKET)).get(machine_token_key("local"))).value
            assert raw is not None and raw.startswith(SEALED)
        finally:
            await service.stop()
        base = dict(servers=[server.url], connect_timeout=2, tls_ca=pem["ca"])
        # the right password but no client certificate: the TLS handshake is refused
        with pytest.raises(NatsUnavailable):
            await connect(NatsOptions(**base, user="svc", password="s3cret-pass-0123456789"))
        assert "refused our credentials" in await _refused(NatsOptions(
            **base, tls_cert=pem["client"], tls_key=pem["client-key"], user="svc", password="wrong"))
        # a server whose certificate our CA did not sign fails at once, saying so
        (tmp_path / "other").mkdir()
        other = _tls_material(tmp_path / "other")
        assert "does not verify" in await _refused(NatsOptions(
            servers=[server.url], connect_timeout=30, tls_ca=other["ca"], user="svc", password="x"))


async def test_external_nats_with_a_token_or_an_nkey(tmp_path: Path) -> None:
    token_file = tmp_path / "nats-token"
    token_file.write_text("tok-0123456789abcdef\n")
    async with ConfiguredNats(tmp_path, "token-nats", 'authorization {\n token: "tok-0123456789abcdef"\n}\n') as server:
        settings = service_settings(tmp_path, server.url, nats_token_file=token_file, roles=["projector"],
                                    local_machine=False, registry=[])
        nc = await connect(settings.store.nats_options())
        await nc.close()
        assert "refused" in await _refused(NatsOptions(servers=[server.url], token="wrong", connect_timeout=5))
    seed = tmp_path / "user.nk"
    seed.write_text(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())
    nats = EmbeddedNats(tmp_path / "nkey-nats", nkey_seed=seed)
    url = await nats.start()
    try:
        settings = service_settings(tmp_path, url, nats_nkey_seed=seed, data_dir=tmp_path / "nkey-data")
        service = Service(settings)
        await service.start()
        await service.stop()
    finally:
        await nats.stop()


def _operator_mode(tmp: Path) -> tuple[str, Path, Path]:
    """A nats-server configuration in operator mode (an operator, a system account and an
    account with JetStream, preloaded) and two ``.creds`` files: a user of that account, and a
    user signed by an account the server does not know."""
    import base64
    import hashlib
    import json
    import time

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def pair(prefix: int) -> tuple[Any, str, str]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        kp = nkeys.from_seed(bytearray(seed))
        return kp, seed.decode(), kp.public_key.decode()

    def jwt(signer: Any, claims: dict[str, Any]) -> str:
        claims = {"iat": int(time.time()), **claims}
        claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode()
        head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = b64(json.dumps(claims).encode())
        return f"{head}.{body}.{b64(signer.sign(f'{head}.{body}'.encode()))}"

    unlimited = {k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")} | {"wildcards": True}
    op, _, op_pub = pair(nkeys.PREFIX_BYTE_OPERATOR)
    sys_acc, _, sys_pub = pair(nkeys.PREFIX_BYTE_ACCOUNT)
    acc, _, acc_pub = pair(nkeys.PREFIX_BYTE_ACCOUNT)
    stranger, _, stranger_pub = pair(nkeys.PREFIX_BYTE_ACCOUNT)
    op_jwt = jwt(op, {"iss": op_pub, "sub": op_pub, "name": "op", "nats": {"type": "operator", "version": 2}})
    sys_jwt = jwt(op, {"iss": op_pub, "sub": sys_pub, "name": "SYS",
                       "nats": {"type": "account", "version": 2, "limits": unlimited}})
    acc_jwt = jwt(op, {"iss": op_pub, "sub": acc_pub, "name": "mlynar", "nats": {
        "type": "account", "version": 2,
        "limits": unlimited | {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}}})
    config = (f'operator: "{op_jwt}"\nsystem_account: {sys_pub}\nresolver: MEMORY\n'
              f'resolver_preload: {{\n  {acc_pub}: "{acc_jwt}"\n  {sys_pub}: "{sys_jwt}"\n}}\n')
    files = []
    for name, signer, issuer in (("user", acc, acc_pub), ("stranger", stranger, stranger_pub)):
        _, seed, pub = pair(nkeys.PREFIX_BYTE_USER)
        user_jwt = jwt(signer, {"iss": issuer, "sub": pub, "name": name, "nats": {
            "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}})
        path = tmp / f"{name}.creds"
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n")
        files.append(path)
    return config, files[0], files[1]


async def test_external_nats_in_operator_mode_with_a_creds_file(tmp_path: Path) -> None:
    config, creds, stranger = _operator_mode(tmp_path)
    async with ConfiguredNats(tmp_path, "operator-nats", config) as server:
        key_file = tmp_path / "secrets.key"
        key_file.write_text("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n")
        service = Service(service_settings(tmp_path, server.url, nats_creds=creds, secrets_key_file=key_file))
        await service.start()
        try:
            assert service.store is not None and await service.store.last_seq() > 0  # the registry declared
        finally:
            await service.stop()
        assert "refused" in await _refused(NatsOptions(servers=[server.url], creds=stranger, connect_timeout=5))


async def test_conflicting_or_missing_nats_credentials_do_not_start(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-0123456789\n")
    with pytest.raises(ConfigError, match="one way to authenticate"):
        await Service(service_settings(tmp_path, "nats://127.0.0.1:1", nats_user="u", nats_password_file=token_file,
                                       nats_token_file=token_file)).start()
    with pytest.raises(ConfigError, match="nats-password-file"):
        await Service(service_settings(tmp_path, "nats://127.0.0.1:1", nats_user="u",
                                       nats_password_file=tmp_path / "missing")).start()
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="secrets key file"):
        await Service(service_settings(tmp_path, None, secrets_key_file=empty)).start()


async def test_a_replica_count_mismatch_is_reported(tmp_path: Path, nats_url: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    first = Service(service_settings(tmp_path, nats_url, roles=["projector"], local_machine=False, registry=[]))
    await first.start()
    await first.stop()
    again = Service(service_settings(tmp_path, nats_url, roles=["projector"], local_machine=False, registry=[],
                                     stream_replicas=3))
    with caplog.at_level(logging.WARNING, logger="mlynar.serve"):
        await again.start()
        await again.stop()
    [record] = [r for r in caplog.records if "--stream-replicas is 3" in r.getMessage()]
    assert "has 1 replica(s)" in record.getMessage()


async def test_a_shared_directory_given_by_mistake_is_not_tightened(tmp_path: Path) -> None:
    """``--blob-dir /tmp`` must not make /tmp private: a sticky directory is left as it is."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    service = Service(service_settings(tmp_path, None, blob_dir=shared, local_machine=False))
    await service.start()
    try:
        assert _mode(shared) == 0o1777
        assert _mode(service.settings.data_dir) == 0o700
    finally:
        await service.stop()


async def test_another_secrets_key_does_not_start(tmp_path: Path) -> None:
    """A replica given a key file that does not open the sealed secrets stops at start, saying
    so, instead of failing every step that needs a machine token later."""
    first = Service(service_settings(tmp_path, None))
    await first.start()
    await first.stop()
    other = tmp_path / "other.key"
    other.write_text("ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=\n")
    with pytest.raises(ConfigError, match="do not decrypt with this secrets key"):
        await Service(service_settings(tmp_path, None, secrets_key_file=other)).start()
