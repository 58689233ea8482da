"""Shared pieces of the benchmarks: results, sizes, percentiles, a fresh embedded NATS, and a
``mlynar serve`` subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import aiohttp

from mlynar_events.nats_server import EmbeddedNats, free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """One figure next to its floor. ``ratio`` is value/floor (for a throughput: the share of the
    floor reached, higher is better; for a latency: how many times the floor, lower is better).
    ``target`` says what is wanted in words; ``met`` is None when there is no target."""

    name: str
    value: float
    unit: str
    floor: float | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    note: str | None = None

    def as_json(self) -> dict:
        d = asdict(self)
        for k in ("value", "floor", "ratio"):
            if isinstance(d[k], float):
                d[k] = round(d[k], 4)
        if d["note"] is None:
            del d["note"]
        return d


def ratio(value: float, floor: float | None) -> float | None:
    if not floor:
        return None
    return value / floor


@dataclass(frozen=True)
class Sizes:
    smoke: bool
    append_events: int
    append_concurrency: int
    replay_events: int
    sched_single: int  # samples with one run
    sched_runs: int  # concurrent runs
    sched_rounds: int  # units per concurrent run
    solver_pools: tuple[int, ...]
    solver_new_units: int
    e2e_steps: int
    e2e_max_parallel: int
    api_runs: int
    api_clients: int
    api_requests: int
    sse_clients: int
    sse_events: int


FULL = Sizes(smoke=False, append_events=20_000, append_concurrency=32, replay_events=200_000,
             sched_single=300, sched_runs=100, sched_rounds=10, solver_pools=(100, 1_000, 10_000),
             solver_new_units=500, e2e_steps=1_000, e2e_max_parallel=16, api_runs=1_000, api_clients=50,
             api_requests=10_000, sse_clients=200, sse_events=200)
SMOKE = Sizes(smoke=True, append_events=1_000, append_concurrency=32, replay_events=2_000,
              sched_single=20, sched_runs=100, sched_rounds=1, solver_pools=(100, 1_000, 10_000),
              solver_new_units=50, e2e_steps=20, e2e_max_parallel=16, api_runs=20, api_clients=50,
              api_requests=500, sse_clients=10, sse_events=20)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@contextlib.asynccontextmanager
async def embedded_nats(tmp: Path) -> AsyncIterator[str]:
    """A fresh nats-server with JetStream in ``tmp``."""
    server = EmbeddedNats(tmp / "nats")
    url = await server.start()
    try:
        yield url
    finally:
        await server.stop()


def clean_env() -> dict[str, str]:
    """The environment for child processes: no MLYNAR_* of the developer's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLYNAR_")}


def mlynar_bin() -> list[str]:
    exe = Path(sys.executable).parent / "mlynar"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlynar_events.cli"]


class ServeProcess:
    """``mlynar serve`` as a child process (so its CPU and RSS are its own)."""

    def __init__(self, data_dir: Path, nats_url: str, roles: str, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*mlynar_bin(), "serve", "--data-dir", str(data_dir), "--nats-url", nats_url,
                     "--host", "127.0.0.1", "--port", str(self.port), "--roles", roles,
                     "--log-level", "WARNING", *extra]
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        self.http = "api" in roles.split(",")
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 60.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdout=self._log, stderr=asyncio.subprocess.STDOUT, env=clean_env(), cwd=str(REPO))
        if not self.http:
            return
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"mlynar serve exited {self.proc.returncode}: {self.tail()}")
                try:
                    async with http.get(self.url + "/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"mlynar serve did not answer within {timeout}s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def vm_hwm_kib(self) -> int | None:
        """Peak resident set size (VmHWM) of the service process, in KiB."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._log.close()

    async def __aenter__(self) -> "ServeProcess":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
