"""Liveness of one ``mlynar serve``, tried on real processes: the embedded nats-server SIGKILLed
comes back and a run completes afterwards (and one that keeps dying stops the service with a
non-zero exit); ``/healthz`` answers 503 while NATS is gone; a second serve on the same data
directory refuses to start naming the holder; start-up against a dead NATS port retries quietly,
honours SIGTERM and gives up after ``--nats-connect-timeout``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from mlynar_events.example import run_example
from mlynar_events.nats_server import MAX_RESTARTS, EmbeddedNats, free_port
from mlynar_events.serve import Service

from agent_helpers import clean_env
from support import EXAMPLES, REPO, json_records, service_settings, wait_until

MLYNAR = [str(Path(sys.executable).parent / "mlynar")] if (Path(sys.executable).parent / "mlynar").exists() \
    else [sys.executable, "-m", "mlynar_events.cli"]


class Serve:
    """``mlynar serve`` as a child process with JSON logs in a file."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.log = tmp / f"{name}.log"
        self.argv = [*MLYNAR, "serve", "--port", "0", "--log-format", "json", "--log-level", "INFO", *args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        return json_records(self.text())

    def messages(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("message") == message]

    def messages_starting(self, prefix: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if str(r.get("message", "")).startswith(prefix)]

    async def wait_for(self, predicate: Callable[["Serve"], Any], what: str, timeout: float = 30.0) -> Any:
        async def check() -> Any:
            found = predicate(self)
            if not found and self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode} waiting for {what}:\n{self.text()[-3000:]}")
            return found

        return await wait_until(check, timeout, interval=0.05, what=what)

    async def serving(self) -> str:
        return await self.wait_for(lambda s: next((r["api"] for r in s.messages("mlynar serving")), None),
                                   "the service to serve")

    async def exited(self, timeout: float) -> int:
        async def done() -> bool:
            return self.proc.poll() is not None

        await wait_until(done, timeout, interval=0.05, what=f"serve to exit (log: {self.text()[-2000:]})")
        return self.proc.returncode

    def nats_pids(self) -> list[int]:
        return [r["pid"] for r in self.messages("embedded nats-server listening")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serves(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[Serve] = []

    def start(name: str, *args: str) -> Serve:
        s = Serve(tmp_path, name, *args)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in reversed(started):
            s.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_killed_nats_child_is_restarted_and_a_run_completes(serves: Any, tmp_path: Path) -> None:
    serve = serves("serve", "--data-dir", str(tmp_path / "data"), "--registry", str(EXAMPLES))
    api = await serve.serving()
    [first] = serve.nats_pids()
    killed = time.monotonic()
    os.kill(first, signal.SIGKILL)
    second = await serve.wait_for(lambda s: (s.nats_pids()[1:] or [None])[0], "the nats-server to be restarted")
    assert second != first and _alive(second)
    async with aiohttp.ClientSession(api) as http:
        async def created() -> bool:
            async with http.post("/api/run") as r:
                return r.status == 201

        await wait_until(created, 45, interval=0.2, what="a command to succeed after the restart")
        recovered = time.monotonic() - killed
        assert await run_example(api, None, timeout=60) == 0
        async with http.get("/healthz") as r:
            health = await r.json()
            assert r.status == 200 and health["nats"] == "connected", health
    assert serve.proc.poll() is None
    [died] = serve.messages("embedded nats-server died; restarting it")
    assert died["returncode"] == -signal.SIGKILL
    print(f"commands answered again {recovered:.1f}s after the nats-server was killed")
    assert "Traceback" not in serve.text()


async def test_a_nats_child_that_keeps_dying_stops_the_service(serves: Any, tmp_path: Path) -> None:
    serve = serves("serve", "--data-dir", str(tmp_path / "data"), "--no-local-machine")
    await serve.serving()
    for n in range(MAX_RESTARTS + 1):
        pid = await serve.wait_for(lambda s: (s.nats_pids()[n:] or [None])[0], f"nats-server #{n + 1}")
        os.kill(pid, signal.SIGKILL)
    assert await serve.exited(30) == 1
    assert any(f"died {MAX_RESTARTS + 1} times" in r["message"] for r in serve.messages_starting("stopping: nats-server failed")), serve.text()[-3000:]
    assert all(not _alive(pid) for pid in serve.nats_pids())


async def test_healthz_is_503_while_nats_is_gone(tmp_path: Path) -> None:
    nats = EmbeddedNats(tmp_path / "nats")
    url = await nats.start()
    service = Service(service_settings(tmp_path, url, local_machine=False))
    await service.start()
    try:
        async with aiohttp.ClientSession(service.api_url) as http:
            async def health() -> tuple[int, dict[str, Any]]:
                async with http.get("/healthz") as r:
                    return r.status, await r.json()

            status, body = await wait_until(lambda: _when(health(), lambda sb: sb[1].get("lag") == 0), 15,
                                            what="the projector to catch up")
            assert status == 200 and body["nats"] == "connected" and body["status"] == "ok", body
            await nats.stop()
            status, body = await wait_until(lambda: _when(health(), lambda sb: sb[0] == 503), 15, what="503")
            assert body["status"] == "unavailable" and body["nats"] == "disconnected"
            again = EmbeddedNats(tmp_path / "nats", port=nats.port)  # the same server back
            await again.start()
            try:
                status, body = await wait_until(lambda: _when(health(), lambda sb: sb[0] == 200), 15, what="200")
                assert body["nats"] == "connected"
            finally:
                await service.stop()
                await again.stop()
    finally:
        await service.stop()  # safe twice


async def _when(value: Any, ok: Callable[[Any], bool]) -> Any:
    result = await value
    return result if ok(result) else None


async def test_a_second_serve_on_the_same_data_dir_refuses(serves: Any, tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    first = serves("first", "--data-dir", data, "--no-local-machine")
    api = await first.serving()
    second = serves("second", "--data-dir", data, "--no-local-machine")
    assert await second.exited(20) == 2
    assert f"in use by another mlynar process (pid {first.proc.pid}" in second.text()
    assert len(first.nats_pids()) == 1 and not second.nats_pids()  # no second nats-server on the files
    rebuild = subprocess.run([*MLYNAR, "projections", "rebuild", "--data-dir", data], cwd=REPO, env=clean_env(),
                             capture_output=True, text=True, timeout=60)
    assert rebuild.returncode == 2 and f"pid {first.proc.pid}" in rebuild.stderr
    async with aiohttp.ClientSession(api) as http:
        async with http.get("/healthz") as r:
            assert r.status == 200
    first.stop()
    # the lock went with its holder: the data directory serves again, and rebuilds
    rebuild = subprocess.run([*MLYNAR, "projections", "rebuild", "--data-dir", data], cwd=REPO, env=clean_env(),
                             capture_output=True, text=True, timeout=60)
    assert rebuild.returncode == 0, rebuild.stderr
    third = serves("third", "--data-dir", data, "--no-local-machine")
    await third.serving()


async def test_unreachable_nats_gives_up_after_the_connect_timeout(serves: Any) -> None:
    dead = f"nats://127.0.0.1:{free_port()},nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    serve = serves("dead", "--nats-url", dead, "--nats-connect-timeout", "3", "--no-local-machine")
    code = await serve.exited(30)
    elapsed = time.monotonic() - started
    assert code == 1
    retries = serve.messages("NATS not reachable yet, retrying")
    assert 2 <= len(retries) <= 12, len(retries)  # bounded, backing off: not one every 0.5 s
    assert [r["attempt"] for r in retries] == list(range(1, len(retries) + 1))
    assert any("not reachable within 3s" in r["message"] for r in serve.records()), serve.text()
    assert "Traceback" not in serve.text()
    assert elapsed < 20, elapsed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_during_start_up_stops_it(serves: Any, sig: signal.Signals) -> None:
    serve = serves("waiting", "--nats-url", f"nats://127.0.0.1:{free_port()}", "--nats-connect-timeout", "120",
                   "--no-local-machine")
    await serve.wait_for(lambda s: s.messages("NATS not reachable yet, retrying"), "a first retry")
    sent = time.monotonic()
    serve.proc.send_signal(sig)
    assert await serve.exited(10) == 0
    assert time.monotonic() - sent < 5
    assert serve.messages("stopped during start-up")
    assert "Traceback" not in serve.text()
