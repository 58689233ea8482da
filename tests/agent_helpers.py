"""Helpers for tests/test_agent.py: start real agent processes and wait on conditions."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
TERMINAL = {"succeeded", "failed", "cancelled"}


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any MLYNAR_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLYNAR_")}
    env.update(extra)
    return env


class AgentProcess:
    """``python -m executors.agent`` as a child process on 127.0.0.1 with a free port."""

    def __init__(self, work_dir: Path, *args: str, env: dict[str, str] | None = None, log_file: Path | None = None):
        self.work_dir = work_dir
        self.args = list(args)
        self.env = env if env is not None else clean_env()
        self.log_file = log_file or work_dir.parent / f"{work_dir.name}.agent.log"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self, timeout: float = 20.0) -> "AgentProcess":
        cmd = [PYTHON, "-m", "executors.agent", "--host", "127.0.0.1", "--port", "0",
               "--work-dir", str(self.work_dir), *self.args]
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"agent did not report its URL within {timeout} s; log: {self.log_text()}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"agent exited with {self.proc.wait()}; log: {self.log_text()}")
                buf += chunk
        finally:
            sel.close()
        line = buf.split(b"\n", 1)[0].decode()
        assert "listening on " in line, line
        self.url = line.rsplit("listening on ", 1)[1].strip()
        return self

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self._log.close()
        return self.proc.returncode


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Re-check ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_terminal(client, step_id: str, timeout: float = 20.0) -> dict:
    """Long-poll the agent until the step is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"step {step_id} not terminal after {timeout} s")
        st = await client.status(step_id, wait=min(remaining, 30.0))
        if st["state"] in TERMINAL:
            return st


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def processes_with(marker: str) -> list[int]:
    """Pids (in this PID namespace) of live processes whose command line contains ``marker``:
    finds a step's processes wherever they went (another session, re-parented, a PID namespace)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and not pid_gone(int(name)):
            found.append(int(name))
    return found


def bwrap_works() -> bool:
    """Whether Bubblewrap is installed here (CI installs it; .ci/run)."""
    import shutil

    return shutil.which("bwrap") is not None
