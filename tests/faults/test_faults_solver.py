"""Two solver replicas racing on a fan-out run, on a real three-node cluster (R3), each on its
own node: where they append the same step at the same moment JetStream answers 10158
("duplicate message id is in process") to one of them. The run completes, no solver dies, each
input set is scheduled exactly once (finding 1 of the fault probe: the role crashed)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from mlynar_events.events import RunCompleted
from mlynar_events.store import EventStore
from solver_reference import OpModel, Unit, solve
from test_solver import Scene, SolverReplica, check_history, create_run, declare, quiesce, scheduled_keys

from conftest import NatsCluster

FAN_OUT = [
    OpModel("split", (("WHOLE", "whole"),), ("slice",), fanout=20),
    OpModel("per-slice", (("SLICE", "slice"),), ("result",)),
    OpModel("pair", (("SLICE", "slice"), ("OTHER", "other"))),
]


async def test_two_solvers_racing_schedule_each_step_once(
        cluster: NatsCluster, cluster_store: EventStore, caplog: pytest.LogCaptureFixture, recovery: Any) -> None:
    caplog.set_level(logging.INFO, "mlynar.store")
    solvers = [await SolverReplica(node.url).start() for node in cluster.nodes[:2]]
    scene = await Scene(cluster_store, FAN_OUT).open(seed=3)
    began = time.monotonic()
    try:
        await declare(cluster_store, FAN_OUT)
        uploads = [Unit("w", "whole"), Unit("o1", "other"), Unit("o2", "other")]
        await create_run(cluster_store, scene.run_id, uploads, max_parallel=16)
        await scene.history.wait_for(RunCompleted, checks=[*solvers, scene.executor], timeout=60)
        events = await quiesce(cluster_store, scene.run_id, solvers)
        check_history(events, 16)
        keys = scheduled_keys(events)
        assert set(keys) == solve(FAN_OUT, uploads).steps and len(keys) == 1 + 20 + 40
        for s in solvers:
            s.check()  # both still running
        raced = sum(1 for r in caplog.records if "10158" in str(getattr(r, "error", "")))
        recovery.record("two solvers racing on a 61-step fan-out", time.monotonic() - began,
                        what="the run complete, no solver down", steps_scheduled=len(keys), appends_met_10158=raced)
    finally:
        await scene.close()
        for s in solvers:
            await s.stop()
