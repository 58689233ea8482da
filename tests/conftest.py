"""Shared fixtures: a real nats-server on a free loopback port, the event store on it, and a whole
in-process service (API + projector + solver + executor + built-in agent) over real HTTP."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest

from mlynar_events.nats_server import EmbeddedNats
from mlynar_events.serve import Service
from mlynar_events.store import EventStore

from kube_fake import TEST_NAMESPACE, FakeKube
from support import Api, service_settings

# where tests leave files for a human to look at (the web view's screenshots); read before the
# MLYNAR_* variables are cleared, since it configures the tests, not the service
ARTIFACTS = os.environ.get("MLYNAR_ARTIFACTS")

# tests run with no MLYNAR_* variable of the developer's shell leaking into settings
for _k in [k for k in os.environ if k.startswith("MLYNAR_")]:
    del os.environ[_k]


@pytest.fixture
async def nats_url(tmp_path: Path) -> AsyncIterator[str]:
    server = EmbeddedNats(tmp_path / "nats")
    url = await server.start()
    try:
        yield url
    finally:
        await server.stop()


@pytest.fixture
async def store(nats_url: str) -> AsyncIterator[EventStore]:
    s = await EventStore.connect(nats_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def make_service(tmp_path: Path, nats_url: str) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Start services (all stopped at teardown); keyword arguments override settings."""
    started: list[tuple[Service, aiohttp.ClientSession]] = []

    async def start(**overrides: Any) -> Api:
        service = Service(service_settings(tmp_path, nats_url, **overrides))
        await service.start()
        http = aiohttp.ClientSession(service.api_url)
        started.append((service, http))
        return Api(http, service)

    try:
        yield start
    finally:
        for service, http in reversed(started):
            await http.close()
            await service.stop()


@pytest.fixture
async def api(make_service: Callable[..., Awaitable[Api]]) -> Api:
    return await make_service()


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeKube]:
    """A stateful Kubernetes API stand-in (namespace ``TEST_NAMESPACE``) with its test kubelet."""
    f = FakeKube(tmp_path / "kube", namespace=TEST_NAMESPACE)
    await f.start()
    try:
        yield f
    finally:
        await f.stop()


@pytest.fixture
def artifacts(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A directory for a test's artifacts: ``$MLYNAR_ARTIFACTS/<test name>`` when set (kept after
    the run, for a human to look at), else one under the test's ``tmp_path``."""
    base = Path(ARTIFACTS) if ARTIFACTS else tmp_path / "artifacts"
    path = base / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (we run as root in CI): a real disk that fills up."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
