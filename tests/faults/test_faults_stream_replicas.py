"""``--stream-replicas`` on an existing stream, on the three-node cluster: a stream created at R1
(a deployment that started on one node, or before ``--stream-replicas 3``) is raised to R3 by
the next process asking for 3, and then survives its leader being SIGKILLed with every event;
a process asking for fewer (the default 1) never lowers it."""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from mlynar_events.events import STREAM, RunCreated, StepFailed
from mlynar_events.store import EventStore, run_filter
from support import wait_until

from conftest import NatsCluster


async def test_an_r1_stream_is_raised_to_r3_and_never_lowered(
        cluster: NatsCluster, caplog: pytest.LogCaptureFixture, recovery: object) -> None:
    caplog.set_level(logging.INFO, "mlynar.store")
    opened: list[EventStore] = []

    async def store(replicas: int) -> EventStore:
        s = EventStore(await cluster.connect(), replicas=replicas)
        opened.append(s)
        await s.ensure_stream()
        return s

    try:
        one = await store(1)
        run_id = f"r1-{uuid.uuid4().hex[:8]}"
        await one.append(RunCreated(run_id=run_id), actor="test", msg_id=f"{run_id}:0")
        for i in range(1, 50):
            await one.append(StepFailed(run_id=run_id, step_id=f"s{i}", attempt=1, error="x"), actor="test",
                             msg_id=f"{run_id}:{i}")
        assert (await one.js.stream_info(STREAM)).config.num_replicas == 1

        raised_at = time.monotonic()
        three = await store(3)
        assert (await three.js.stream_info(STREAM)).config.num_replicas == 3
        assert any(r.getMessage() == f"stream {STREAM} raised from 1 to 3 replicas" for r in caplog.records)

        async def replicated() -> bool:
            info = await three.js.stream_info(STREAM)
            peers = info.cluster.replicas if info.cluster else None
            return bool(peers) and len(peers) == 2 and all(p.current for p in peers)

        await wait_until(replicated, timeout=30, what="both new replicas of the stream current")
        took = time.monotonic() - raised_at

        await store(1)  # the default count: the stream keeps its 3
        assert (await three.js.stream_info(STREAM)).config.num_replicas == 3

        leader = await cluster.stream_leader(three)
        cluster.kill(leader)  # at R1 this would take the only copy with it
        events = await three.read(run_filter(run_id))
        assert [e.envelope.id for e in events] == [f"{run_id}:{i}" for i in range(50)]
        await three.append(StepFailed(run_id=run_id, step_id="after", attempt=1, error="x"), actor="test")
        recovery.record("--stream-replicas 3 on an existing R1 stream", took,  # type: ignore[attr-defined]
                        what="both new replicas current", events=len(events), leader_killed=leader.name)
    finally:
        for s in opened:
            await s.close()
