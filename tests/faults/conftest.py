"""Fixtures of the fault suite: a real three-node nats-server cluster on loopback (JetStream, the
``MLYNAR`` stream at R3) that a test can SIGKILL and restart node by node, and event stores
connected to it. Reusable by any fault scenario: ``cluster`` for the servers, ``cluster_store``
for a connected store (stream created at R3); ``recovery`` records a scenario's measured
recovery time and ledger counts, listed at the end of the session and written to
``$MLYNAR_ARTIFACTS/faults-recovery.json`` when that variable names a directory (the tests'
artifacts directory, ``tests/conftest.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import nats
import pytest

from mlynar_events.nats_server import free_port, nats_server_binary
from mlynar_events.store import EventStore
from support import wait_until


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    store_dir: Path
    config: Path
    log: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """Three nats-server processes clustered on loopback. ``kill`` is a SIGKILL (no goodbye to the
    peers); ``start`` brings a node back on the same ports and store directory."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.nodes: list[Node] = []
        ports = [(free_port(), free_port()) for _ in range(size)]
        for i, (port, cport) in enumerate(ports):
            name = f"n{i + 1}"
            routes = ", ".join(f"nats-route://127.0.0.1:{c}" for j, (_, c) in enumerate(ports) if j != i)
            node_dir = root / name
            node_dir.mkdir(parents=True)
            config = node_dir / "server.conf"
            config.write_text(f"""
server_name: {name}
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{node_dir / 'js'}" }}
cluster {{
  name: mlynar-faults
  listen: 127.0.0.1:{cport}
  routes: [{routes}]
}}
""")
            self.nodes.append(Node(name, port, cport, node_dir / "js", config, node_dir / "server.log"))

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def start(self, node: Node) -> None:
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen([nats_server_binary(), "-c", str(node.config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, node: Node) -> None:
        if node.alive:
            node.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            node.proc.wait(10)  # type: ignore[union-attr]

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.proc.terminate()  # type: ignore[union-attr]
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()

    async def connect(self, node: Node | None = None, **kwargs: object) -> nats.NATS:
        """A connection to the cluster (to ``node`` first, when given; the others are fallbacks)."""
        servers = self.urls if node is None else [node.url, *(u for u in self.urls if u != node.url)]
        return await nats.connect(servers=servers, dont_randomize=node is not None, max_reconnect_attempts=-1,
                                  reconnect_time_wait=0.2, **kwargs)  # type: ignore[arg-type]

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """JetStream has a meta leader that knows every peer: an R3 stream can be placed (a probe
        stream is created and deleted; right after start "no suitable peers for placement")."""
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=2.0)

            async def ready() -> bool:
                try:
                    await js.add_stream(name="READY_PROBE", subjects=["ready-probe"], num_replicas=3)
                    await js.delete_stream("READY_PROBE")
                    return True
                except Exception:  # noqa: BLE001 - not ready yet: no meta leader, peers unknown
                    return False

            await wait_until(ready, timeout, interval=0.1, what="the JetStream cluster to place an R3 stream")
        finally:
            await nc.close()

    async def stream_leader(self, store: EventStore) -> Node:
        from mlynar_events.events import STREAM

        info = await store.js.stream_info(STREAM)
        assert info.cluster is not None and info.cluster.leader, info
        return self.node(info.cluster.leader)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    c = NatsCluster(tmp_path / "cluster")
    for node in c.nodes:
        c.start(node)
    try:
        await c.wait_ready()
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def cluster_stores(cluster: NatsCluster) -> AsyncIterator[Callable[..., Awaitable[EventStore]]]:
    """Open event stores on the cluster (each its own connection; the stream at R3); all closed at
    teardown."""
    opened: list[EventStore] = []

    async def open_store(node: Node | None = None, **kwargs: object) -> EventStore:
        store = EventStore(await cluster.connect(node), replicas=3, **kwargs)  # type: ignore[arg-type]
        await store.ensure_stream()
        opened.append(store)
        return store

    try:
        yield open_store
    finally:
        for store in opened:
            await store.close()


@pytest.fixture
async def cluster_store(cluster_stores: Callable[..., Awaitable[EventStore]]) -> EventStore:
    return await cluster_stores()


# ---- recovery times, measured by the scenarios -------------------------------------------------


RECOVERIES: list[dict[str, object]] = []


class Recovery:
    def __init__(self, test: str) -> None:
        self.test = test

    def record(self, scenario: str, seconds: float, *, what: str, **counts: object) -> None:
        """``seconds`` from the fault to ``what`` (e.g. "the run complete"); ``counts`` such as
        executions and input sets from the ledger."""
        RECOVERIES.append({"test": self.test, "scenario": scenario, "seconds": round(seconds, 2), "what": what,
                           **counts})


@pytest.fixture
def recovery(request: pytest.FixtureRequest) -> Recovery:
    return Recovery(request.node.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if not RECOVERIES:
        return
    terminalreporter.section("fault scenarios: measured recovery")
    for r in RECOVERIES:
        counts = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("test", "scenario", "seconds", "what"))
        terminalreporter.write_line(f"{r['scenario']}: {r['seconds']:.2f} s to {r['what']}" + (f"; {counts}" if counts else ""))
    out = _artifacts(config)
    if out:
        path = Path(out) / "faults-recovery.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(RECOVERIES, indent=2) + "\n")
        terminalreporter.write_line(f"written to {path}")


def _artifacts(config) -> str | None:  # type: ignore[no-untyped-def]
    """``ARTIFACTS`` of tests/conftest.py (``$MLYNAR_ARTIFACTS``, read there before the MLYNAR_*
    variables are cleared)."""
    root = Path(__file__).resolve().parent.parent / "conftest.py"
    for plugin in config.pluginmanager.get_plugins():
        file = getattr(plugin, "__file__", None)
        if file and Path(file).resolve() == root:
            return getattr(plugin, "ARTIFACTS", None)
    return None


# ---- a small disk of its own ---------------------------------------------------------------------


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file (delete it to free the space again)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 1):  # big writes, then the last partial page byte by byte
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


# ---- one executor stack in this process, on real parts ------------------------------------------


LEDGER_OPERATOR = '''\
import json, os, pathlib, sys, time
item = pathlib.Path(os.environ["ITEM"]).read_text().strip() if os.environ.get("ITEM") else "-"
with open(os.environ["LEDGER"], "a") as f:  # one line per real execution
    f.write(f"{item} {os.getpid()}\\n")
gate = os.environ.get("GATE")
if gate:
    pids = os.environ.get("PIDS")
    if pids:
        pathlib.Path(pids, item).write_text(str(os.getpid()))
    deadline, poll = time.monotonic() + 120, 0.02  # the operator polls for the gate the test opens
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            sys.exit("gave up waiting for " + gate)
        time.sleep(poll)
out = pathlib.Path(os.environ["MLYNAR_OUTPUT_DIR"])
(out / "result.txt").write_text(f"done {item}")
(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "result", "file": "result.txt"}]}))
'''


def ledger_operator(tmp_path: Path) -> Path:
    """An operator script that appends ``<item> <pid>`` to ``$LEDGER`` per real execution, waits
    for ``$GATE`` (if set) and outputs ``done <item>`` as kind ``result``."""
    path = tmp_path / "ledger_op.py"
    path.write_text(LEDGER_OPERATOR)
    return path


def ledger_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
