"""Heartbeats and the short ack-wait: a dead executor's steps are taken over within seconds (see
``test_faults_replicas.py``), so a live executor's must never be. Here, in this process on real
parts (a nats-server, an agent): a step running for several ack-waits while the executor's event
loop is repeatedly blocked is delivered once; an executor follows the shared consumer's ack-wait
when another one lowers it; and a redelivered step finding its attempt released (its outcome
recorded by another executor meanwhile) does not create it again."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

import executors.worker as worker_module
from executors.worker import DURABLE, StepWorker
from executors.machine_client import AgentClient, AgentError
from mlynar_events.blobs import FileBlobStore
from mlynar_events.events import STREAM
from mlynar_events.store import EventStore
from support import wait_until
from test_faults_executor import _true, agent_url, stacks  # noqa: F401  (fixtures)

from conftest import ledger_lines, ledger_operator

ACK_WAIT = 1.5
BLOCK = 1.1
"""Each stall of the event loop, started right after a beat: the next beat comes more than one
interval (0.5 s) late, and the gap between two beats stays under the ack-wait (1.5 s)."""


async def test_a_live_executors_long_step_is_never_redelivered(
        stacks: Any, agent_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, "mlynar.executor")
    stack = await stacks(ack_wait=ACK_WAIT, update_consumer=True)
    ledger, gate = tmp_path / "ledger.txt", tmp_path / "gate"
    await stack.declare(agent_url, ledger_operator(tmp_path), {"LEDGER": str(ledger), "GATE": str(gate)})
    run_id = await stack.run_of(["a"])
    await wait_until(lambda: _true(len(ledger_lines(ledger)) == 1), what="the step running on the agent")
    worker = stack.worker
    assert worker is not None
    began = time.monotonic()
    while time.monotonic() - began < 4 * ACK_WAIT:  # the fault: a busy loop, over and over
        rounds = worker.heartbeat_rounds
        time.sleep(BLOCK)  # noqa: ASYNC251 - blocking the executor's loop is the point
        # between stalls the loop runs until the ticker has beaten again (late, after the stall)
        await wait_until(lambda: _true(worker.heartbeat_rounds > rounds), timeout=10, what="a heartbeat round")
    gate.touch()
    state = await stack.wait_status(run_id, "complete")
    [step] = state.steps.values()
    assert (step.status, step.attempt) == ("success", 1), step
    info = await stack.store.js.consumer_info(STREAM, DURABLE)
    assert info.num_redelivered == 0, info
    assert not any(r.getMessage() == "re-attaching step" for r in caplog.records)
    assert len(ledger_lines(ledger)) == 1
    assert stack.worker is not None and stack.worker.heartbeat_late_max > stack.worker.heartbeat_interval
    assert any(r.getMessage() == "heartbeats were late: the executor's event loop was busy" for r in caplog.records)


async def test_an_executor_follows_a_lowered_consumer_ack_wait(
        store: EventStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer created at the old 30 s keeps it for an executor configured at 5 s (it beats
    every 5/3 s anyway); once another executor updates the consumer to 2 s, the first one beats
    by that within ``ACK_WAIT_CHECK``, so none of its steps is redelivered for beating too slowly."""
    monkeypatch.setattr(worker_module, "ACK_WAIT_CHECK", 0.2)
    blobs = FileBlobStore(tmp_path / "blobs")
    old = StepWorker(store, blobs, {}, ack_wait=30.0)
    await old.ensure_consumer()
    first = StepWorker(store, blobs, {}, ack_wait=5.0)
    await first.ensure_consumer()
    assert (first.ack_wait, first.heartbeat_interval) == (30.0, 5.0 / 3)
    follower = asyncio.create_task(first._follow_ack_wait())
    try:
        await StepWorker(store, blobs, {}, ack_wait=2.0, update_consumer=True).ensure_consumer()
        await wait_until(lambda: _true(first.ack_wait == 2.0), timeout=10, what="the executor following the consumer")
        assert first.heartbeat_interval == 2.0 / 3
    finally:
        follower.cancel()


async def test_a_redelivery_finding_its_attempt_released_does_not_create_it_again(
        stacks: Any, agent_url: str, tmp_path: Path) -> None:  # noqa: F811
    """The step is finished and its attempt released on the agent; a redelivery that read the
    run before that (the window between its read and its GET) finds nothing to attach to: it
    re-reads the run, sees the outcome and creates nothing (before, it PUT the attempt and the
    operator ran again)."""
    stack = await stacks()
    ledger = tmp_path / "ledger.txt"
    await stack.declare(agent_url, ledger_operator(tmp_path), {"LEDGER": str(ledger)})
    run_id = await stack.run_of(["a"])
    state = await stack.wait_status(run_id, "complete")
    [step] = state.steps.values()
    assert step.status == "success" and len(ledger_lines(ledger)) == 1
    worker = stack.worker
    assert worker is not None
    attempt = worker._attempt_of(stack.backend, step.scheduled, 1)  # what the stale redelivery would run
    async with AgentClient(agent_url, None) as client:
        async def released() -> bool:
            try:
                await client.status(attempt.external_id)
                return False
            except AgentError as exc:
                assert exc.status == 404, exc
                return True

        await wait_until(released, what="the attempt released on the agent (after its outcome)")
        result = await worker._attempt(stack.backend, attempt, reattach=True)
        assert result.superseded and not result.ok, result
        assert await released()  # nothing created
    assert len(ledger_lines(ledger)) == 1
