"""The executor under faults, in this process on real parts (a nats-server, agents, files): a blob
disk that is full, an agent that is restarted mid-step, an agent that cannot be reached, and the
shared consumer's ack-wait. The solver, the machine directory and the worker run as they do in
``serve``; the test appends the registry and the run's commands itself.

Each operator appends one line per real execution to a ledger, so "ran once" is counted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from executors.agent.app import start_agent
from executors.agent.settings import AgentSettings
from executors.machine import MachineBackend, MachineDirectory
from executors.worker import DURABLE, StepWorker
from mlynar_events.blobs import FileBlobStore, unit_key
from mlynar_events.events import (
    STREAM, DataKindDeclared, DataUnitAdded, MachineRegistered, OperatorDeclared, RunCreated, RunStarted,
    StepAttemptFailed, StepFailed, StepSucceeded,
)
from mlynar_events.nats_server import free_port
from mlynar_events.runstate import RunState
from mlynar_events.secrets import SecretStore
from mlynar_events.solver import Solver
from mlynar_events.specs import DataKindSpec, OperatorSpec
from mlynar_events.store import EventStore, run_filter
from mlynar_events.tasks import cancel_and_wait
from support import wait_until

from agent_helpers import clean_env
from conftest import NatsCluster, fill, ledger_lines, ledger_operator

MLYNAR = [str(Path(sys.executable).parent / "mlynar")]


class Stack:
    """Solver + machine directory + worker on one store, the blobs under ``blob_dir``."""

    def __init__(self, store: EventStore, blob_dir: Path, workdir: Path, **worker: Any) -> None:
        self.store = store
        self.blobs = FileBlobStore(blob_dir)
        self.worker_kwargs = worker
        self.workdir = workdir
        self.tasks: list[asyncio.Task] = []
        self.worker: StepWorker | None = None

    async def start(self) -> "Stack":
        directory = MachineDirectory(self.store)
        self.backend = MachineBackend(directory, await SecretStore.open(self.store.js), self.blobs)
        self.worker = StepWorker(self.store, self.blobs, {"machine": self.backend}, workdir=self.workdir,
                                 retry_base=0.1, **self.worker_kwargs)
        for coro in (Solver(self.store).run(), directory.run(), self.worker.run()):
            self.tasks.append(asyncio.create_task(coro))
        return self

    def check(self) -> None:
        for t in self.tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise AssertionError(f"a role ended: {t.exception()!r}") from t.exception()

    async def stop(self) -> None:
        await cancel_and_wait(self.tasks)
        await self.backend.close()

    async def declare(self, machine_url: str, script: Path, env: dict[str, str], **spec: Any) -> None:
        s = self.store
        await s.append(MachineRegistered(name="m", url=machine_url), actor="test", msg_id=f"machine:{machine_url}")
        for kind in ("item", "result"):
            await s.append(DataKindDeclared(name=kind, spec=DataKindSpec()), actor="test")
        await s.append(OperatorDeclared(name="once", revision=1, spec=OperatorSpec.model_validate({
            "machine": "m", "command": [sys.executable, str(script)],
            "inputs": [{"fileLocationEnv": "ITEM", "dataKind": "item"}], "possibleOutputKinds": ["result"],
            "constantEnv": [{"name": k, "value": v} for k, v in env.items()], **spec})), actor="test")

    async def run_of(self, items: list[str]) -> str:
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        await self.store.append(RunCreated(run_id=run_id), actor="test")
        for item in items:
            unit_id = f"u-{item}"
            source = self.workdir.parent / f"upload-{item}"
            source.write_text(item)
            info = await self.blobs.put_file(unit_key(run_id, unit_id), source)
            await self.store.append(DataUnitAdded(run_id=run_id, unit_id=unit_id, data_kind="item", blob=info.key,
                                                  size=info.size, sha256=info.sha256, filename="item.txt"),
                                    actor="test")
        await self.store.append(RunStarted(run_id=run_id, max_parallel=len(items) or 1), actor="test")
        return run_id

    async def state(self, run_id: str) -> RunState:
        return RunState.from_events(run_id, await self.store.read(run_filter(run_id)))

    async def wait_status(self, run_id: str, status: str, timeout: float = 30.0) -> RunState:
        async def check() -> RunState | None:
            self.check()
            state = await self.state(run_id)
            return state if state.status == status else None

        return await wait_until(check, timeout, interval=0.05, what=f"run {run_id} to be {status}")

    async def events(self, run_id: str, cls: type) -> list[Any]:
        return [e.event for e in await self.store.read(run_filter(run_id)) if isinstance(e.event, cls)]


@pytest.fixture
async def stacks(store: EventStore, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    started: list[Stack] = []

    async def start(blob_dir: Path | None = None, **worker: Any) -> Stack:
        n = len(started) + 1
        stack = await Stack(store, blob_dir or tmp_path / "blobs", tmp_path / f"executor-{n}", **worker).start()
        started.append(stack)
        return stack

    try:
        yield start
    finally:
        for s in reversed(started):
            await s.stop()


@pytest.fixture
async def agent_url(tmp_path: Path) -> AsyncIterator[str]:
    agent = await start_agent(AgentSettings(host="127.0.0.1", port=0, insecure_no_auth=True,
                                            work_dir=tmp_path / "agent", isolation="none", max_parallel=8))
    try:
        yield agent.url
    finally:
        await agent.stop()


# ---- finding 4: a full blob disk -----------------------------------------------------------------


async def test_a_full_blob_disk_fails_the_step_visibly_within_its_budget(
        stacks: Any, agent_url: str, small_disk: Path, tmp_path: Path, recovery: Any) -> None:
    """The blob store's disk is full when the outputs are stored: the writes are retried for
    ``outcome_retry_for``, the attempt is lost to the infrastructure (retried ``infra_retries``
    times, not ``retries``), then the step fails saying why — no endless re-execution."""
    stack = await stacks(small_disk / "blobs", outcome_retry_for=1.0, infra_retries=1)
    ledger = tmp_path / "ledger.txt"
    await stack.declare(agent_url, ledger_operator(tmp_path), {"LEDGER": str(ledger)})
    run_id = await stack.run_of(["a"])  # the input's bytes are stored before the disk fills
    fill(small_disk)
    started = time.monotonic()
    state = await stack.wait_status(run_id, "complete", timeout=30)
    took = time.monotonic() - started
    [step] = state.steps.values()
    assert step.status == "failure", step
    assert "cannot store output 0 (result) in the blob store: No space left on device" in (step.error or ""), step.error
    [failed] = await stack.events(run_id, StepFailed)
    assert failed.infrastructure and failed.attempt == 2
    [lost] = await stack.events(run_id, StepAttemptFailed)
    assert lost.infrastructure and lost.attempt == 1
    assert len(ledger_lines(ledger)) == 2  # one execution per attempt, two attempts: the cap
    recovery.record("full blob disk while storing outputs", took, what="the step failed visibly (infrastructure cap)",
                    executions=len(ledger_lines(ledger)), attempts=2)


async def test_a_blob_disk_freed_while_the_writes_retry_succeeds_with_one_execution(
        stacks: Any, agent_url: str, small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Space comes back while the executor retries storing the outputs: the step succeeds on its
    first attempt with the one execution it had, its output stored and correct."""
    caplog.set_level(logging.WARNING, "mlynar.executor")
    stack = await stacks(small_disk / "blobs", outcome_retry_for=60.0)
    ledger = tmp_path / "ledger.txt"
    await stack.declare(agent_url, ledger_operator(tmp_path), {"LEDGER": str(ledger)})
    run_id = await stack.run_of(["a"])
    filler = fill(small_disk)
    await wait_until(lambda: _true(any(r.getMessage() == "cannot store the attempt's outcome; retrying"
                                       for r in caplog.records)), what="the executor retrying a blob write")
    filler.unlink()
    state = await stack.wait_status(run_id, "complete", timeout=60)
    [step] = state.steps.values()
    assert (step.status, step.attempt) == ("success", 1), step
    [unit_id] = step.outputs
    assert (small_disk / "blobs" / unit_key(run_id, unit_id)).read_text() == "done a"
    assert len(ledger_lines(ledger)) == 1


# ---- failures classified: the agent restarted, the agent unreachable -----------------------------


class AgentProc:
    """``mlynar machine-agent`` on a fixed port, so a restart comes back at the same URL."""

    def __init__(self, work_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [*MLYNAR, "machine-agent", "--host", "127.0.0.1", "--port", str(self.port),
                     "--insecure-no-auth", "--isolation", "none", "--run-as-user=", "--work-dir", str(work_dir)]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AgentProc":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=clean_env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


async def test_an_agent_restarted_mid_step_does_not_use_the_operators_retries(
        stacks: Any, tmp_path: Path, recovery: Any) -> None:
    """``retries: 0`` and the agent is SIGKILLed and restarted while the step runs: the attempt is
    reported lost by the agent, retried as attempt 2 without counting against ``retries``, and
    the step succeeds. Its attempt record says ``infrastructure``; no StepFailed."""
    agent = AgentProc(tmp_path / "agent-work", tmp_path / "agent.log").start()
    try:
        stack = await stacks()
        ledger, gate, pids = tmp_path / "ledger.txt", tmp_path / "gate", tmp_path / "pids"
        pids.mkdir()
        await stack.declare(agent.url, ledger_operator(tmp_path),
                            {"LEDGER": str(ledger), "GATE": str(gate), "PIDS": str(pids)}, retries=0)
        run_id = await stack.run_of(["a"])
        await wait_until(lambda: _true((pids / "a").exists()), what="the step running on the agent")
        first_pid = int((pids / "a").read_text())
        agent.kill()
        with contextlib.suppress(ProcessLookupError):  # the operator the dead agent may have left behind
            os.kill(first_pid, signal.SIGKILL)
        (pids / "a").unlink()
        killed = time.monotonic()
        agent.start()
        await wait_until(lambda: _true((pids / "a").exists()), timeout=30, what="attempt 2 on the restarted agent")
        gate.touch()
        state = await stack.wait_status(run_id, "complete", timeout=30)
        [step] = state.steps.values()
        assert step.status == "success" and step.attempt >= 2, step
        # attempt 1 was lost; on a slow machine the agent may still be starting when attempt 2
        # tries to reach it (lost too, before anything ran): never counted against retries: 0
        lost = await stack.events(run_id, StepAttemptFailed)
        assert [(a.attempt, a.infrastructure) for a in lost] == [(n, True) for n in range(1, step.attempt)], lost
        assert not await stack.events(run_id, StepFailed)
        assert len(ledger_lines(ledger)) == 2  # attempt 1 (killed with its agent) and the one that ran
        recovery.record("machine agent SIGKILLed and restarted mid-step", time.monotonic() - killed,
                        what="the run complete", executions=len(ledger_lines(ledger)), input_sets=1,
                        attempts=step.attempt)
    finally:
        agent.kill()


async def test_an_unreachable_agent_fails_the_step_after_the_infrastructure_cap(
        stacks: Any, tmp_path: Path) -> None:
    """Nothing listens at the machine's URL: each attempt is lost (not failed), ``retries`` is
    untouched, and after ``infra_retries`` the step fails with ``infrastructure`` set, naming
    the machine and what happened."""
    stack = await stacks(infra_retries=2)
    ledger = tmp_path / "ledger.txt"
    url = f"http://127.0.0.1:{free_port()}"
    await stack.declare(url, ledger_operator(tmp_path), {"LEDGER": str(ledger)}, retries=5)
    run_id = await stack.run_of(["a"])
    state = await stack.wait_status(run_id, "complete", timeout=45)
    [step] = state.steps.values()
    assert step.status == "failure" and "cannot connect" in (step.error or "") and url in (step.error or ""), step
    attempts = await stack.events(run_id, StepAttemptFailed)
    assert [(a.attempt, a.infrastructure) for a in attempts] == [(1, True), (2, True)]
    [failed] = await stack.events(run_id, StepFailed)
    assert failed.infrastructure and failed.attempt == 3
    assert not ledger.exists()


# ---- the stream leader killed mid-run (finding 12) -----------------------------------------------


async def test_the_stream_leader_killed_mid_run_loses_nothing_and_runs_nothing_twice(
        cluster: NatsCluster, cluster_store: EventStore, agent_url: str, tmp_path: Path, recovery: Any) -> None:
    """Solver and executor on a three-node cluster (R3). With six steps running on the agent,
    the stream leader is SIGKILLed and the steps are let finish: every step succeeds on its
    first attempt, each input set ran once (ledger), every output is stored."""
    items = [str(n) for n in range(6)]
    stack = await Stack(cluster_store, tmp_path / "blobs", tmp_path / "executor", ack_wait=5.0).start()
    try:
        ledger, gate = tmp_path / "ledger.txt", tmp_path / "gate"
        await stack.declare(agent_url, ledger_operator(tmp_path), {"LEDGER": str(ledger), "GATE": str(gate)})
        run_id = await stack.run_of(items)
        await wait_until(lambda: _true(len(ledger_lines(ledger)) == len(items)), timeout=30,
                         what="every step running on the agent")
        leader = await cluster.stream_leader(cluster_store)
        cluster.kill(leader)
        killed = time.monotonic()
        gate.touch()
        state = await stack.wait_status(run_id, "complete", timeout=60)
        took = time.monotonic() - killed
        assert sorted((s.status, s.attempt) for s in state.steps.values()) == [("success", 1)] * len(items)
        assert sorted(line.split()[0] for line in ledger_lines(ledger)) == items
        outputs = sorted((tmp_path / "blobs" / unit_key(run_id, u)).read_text()
                         for s in state.steps.values() for u in s.outputs)
        assert outputs == sorted(f"done {i}" for i in items)
        recovery.record("stream leader node SIGKILLed mid-run", took, what="the run complete",
                        executions=len(ledger_lines(ledger)), input_sets=len(items))
    finally:
        await stack.stop()


# ---- the shared consumer's ack-wait --------------------------------------------------------------


async def test_the_consumer_ack_wait_is_not_whoever_started_last(store: EventStore, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "mlynar.executor")
    blobs = FileBlobStore(tmp_path / "blobs")
    first = StepWorker(store, blobs, {}, ack_wait=30.0)
    await first.ensure_consumer()
    late = StepWorker(store, blobs, {}, ack_wait=2.0)
    await late.ensure_consumer()
    info = await store.js.consumer_info(STREAM, DURABLE)
    assert info.config.ack_wait == 30.0
    assert late.ack_wait == 30.0  # heartbeats by the consumer's ack-wait, not its own
    assert any(r.getMessage().startswith("the shared consumer's ack-wait differs") for r in caplog.records)
    explicit = StepWorker(store, blobs, {}, ack_wait=5.0, update_consumer=True)
    await explicit.ensure_consumer()
    assert (await store.js.consumer_info(STREAM, DURABLE)).config.ack_wait == 5.0


async def _true(value: Any) -> Any:
    return value
