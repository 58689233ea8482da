"""The replica counts ``deploy/`` ships, as separate processes on a three-node cluster (R3): as
many API, solver and executor replicas as its Deployments have (read from the manifests, so the
suite runs what is shipped), a machine agent, and an execution ledger the operator appends to.

* An executor SIGKILLed with steps in flight: the surviving executor takes them over within the
  ack-wait (the deployment's default, ``--executor-ack-wait``) plus a margin, measured from the
  kill to the survivor's ``StepSucceeded`` of each taken-over step (the events' own times);
  each input set ran once, every output is there, every API replica shows the same run.
* The NATS node an API replica is connected to SIGKILLed: the replica reconnects to a live node,
  its ``/healthz`` position keeps advancing and it serves the run's final state.

A soak, by hand: ``FAULTS_SOAK_ROUNDS=20 pytest tests/faults/test_faults_replicas.py -k
executor`` repeats the executor kill on a new run each round (a replacement executor started
after each), every round checked the same way. CI runs one round."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
import yaml

from mlynar_events.config import ServeSettings
from mlynar_events.events import StepStarted, StepSucceeded
from mlynar_events.store import EventStore, run_filter
from support import REPO, Api, wait_until
from test_execution import Proc, _agent_url, data_kind, declare, operator, serving_url, start

from conftest import NatsCluster, Node, ledger_lines, ledger_operator

MLYNAR = [str(Path(sys.executable).parent / "mlynar")]
TOKEN = "agent-secret-token"
ITEMS = [str(n) for n in range(6)]
TAKEOVER_MARGIN = 4.0  # seconds beyond the ack-wait: the re-attach, the download, the appends
OLD_ACK_WAIT = 30.0  # what a dead executor's steps waited before
CATCH_UP_BOUND = 12.0  # seconds an API replica whose node died may trail the other one
SOAK_ROUNDS = int(os.environ.get("FAULTS_SOAK_ROUNDS", "1"))


def deploy_replicas() -> dict[str, int]:
    """``MLYNAR_ROLES`` → ``spec.replicas`` of each Deployment in ``deploy/`` that runs on NATS
    alone (crd-sync needs a Kubernetes API and runs once)."""
    counts: dict[str, int] = {}
    for path in sorted((REPO / "deploy").glob("mlynar-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "Deployment":
                continue
            [container] = doc["spec"]["template"]["spec"]["containers"]
            roles = next(e["value"] for e in container["env"] if e["name"] == "MLYNAR_ROLES")
            if "crd-sync" not in roles:
                counts[roles] = doc["spec"].get("replicas", 1)
    return counts


def test_the_deploy_manifests_are_what_this_suite_runs() -> None:
    """If deploy/ changes its roles or counts, the scenarios below run the new ones; this says
    what they are."""
    counts = deploy_replicas()
    assert set(counts) == {"api,projector", "solver,webhooks", "executor"}, counts
    assert all(n >= 2 for n in counts.values()), counts


class Replicas:
    """deploy/'s replicas of each role as ``mlynar serve`` processes on the cluster, a machine
    agent, and a run of the ledger operator on six inputs."""

    def __init__(self, cluster: NatsCluster, tmp_path: Path) -> None:
        self.cluster, self.tmp = cluster, tmp_path
        self.log_dir = tmp_path / "logs"
        self.log_dir.mkdir()
        self.procs: list[Proc] = []
        self.apis: list[tuple[Proc, str]] = []
        self.executors: list[Proc] = []
        self.ledger, self.gate = tmp_path / "ledger.txt", tmp_path / "gate"

    def spawn(self, name: str, *args: str) -> Proc:
        p = Proc(name, [*MLYNAR, *args], self.log_dir).start()
        self.procs.append(p)
        return p

    def common(self, nats_url: str) -> list[str]:
        return ["--nats-url", nats_url, "--stream-replicas", "3", "--no-local-machine", "--blob-dir",
                str(self.tmp / "blobs"), "--log-format", "json", "--log-level", "INFO"]

    async def start(self, api_nodes: list[Node | None] | None = None) -> "Replicas":
        """``api_nodes[i]``: the one node API replica ``i`` is given (it learns the others from
        the cluster), else all of them."""
        urls = ",".join(self.cluster.urls)
        counts = deploy_replicas()
        apis = []
        for i in range(counts["api,projector"]):
            node = api_nodes[i] if api_nodes and i < len(api_nodes) else None
            apis.append(self.spawn(f"api-{i + 1}", "serve", "--roles", "api,projector", "--port", "0",
                                   "--data-dir", str(self.tmp / f"api-{i + 1}"),
                                   *self.common(node.url if node else urls)))
        for i in range(counts["solver,webhooks"]):
            self.spawn(f"solver-{i + 1}", "serve", "--roles", "solver,webhooks",
                       "--data-dir", str(self.tmp / f"solver-{i + 1}"), *self.common(urls))
        for _ in range(counts["executor"]):
            self.spawn_executor()
        (self.tmp / "agent-token").write_text(TOKEN + "\n")
        agent = self.spawn("agent", "machine-agent", "--host", "127.0.0.1", "--port", "0",
                           "--token-file", str(self.tmp / "agent-token"), "--work-dir", str(self.tmp / "agent-work"),
                           "--isolation", "none", "--run-as-user=", "--max-parallel", str(len(ITEMS)))
        for p in apis:
            self.apis.append((p, await p.wait_log(serving_url, "API listening", timeout=60)))
        self.agent_url = await agent.wait_log(lambda p: _agent_url(p.text()), "agent listening")
        for p in self.executors:
            await p.wait_log(lambda q: self.executor_name(q), "executor started", timeout=60)
        return self

    def spawn_executor(self) -> Proc:
        n = len(self.executors) + 1
        p = self.spawn(f"executor-{n}", "serve", "--roles", "executor", "--data-dir", str(self.tmp / f"executor-{n}"),
                       *self.common(",".join(self.cluster.urls)))
        self.executors.append(p)
        return p

    @staticmethod
    def executor_name(p: Proc) -> str | None:
        return next((r["executor"] for r in p.json_lines() if r.get("message") == "executor started"), None)

    async def run_all_gated(self, api: Api, round_no: int = 0) -> str:
        """A run of six steps, all running on the agent (each appended its ledger line) and
        waiting for the gate; each round with a ledger and a gate of its own."""
        self.ledger, self.gate = self.tmp / f"ledger-{round_no}.txt", self.tmp / f"gate-{round_no}"
        if round_no == 0:
            status, body = await api.call("POST", "/api/machines", json={"name": "remote", "url": self.agent_url,
                                                                          "token": TOKEN})
            assert status == 201, body
        await declare(api, data_kind("item"), data_kind("result"),
                      operator("once", ledger_operator(self.tmp), machine="remote", inputs=[("ITEM", "item")],
                               outputs=["result"], env={"LEDGER": str(self.ledger), "GATE": str(self.gate)}))
        run_id = await api.create_run()
        for item in ITEMS:
            assert (await api.upload(run_id, "item", item.encode()))[0] == 201
        await start(api, run_id, f"?maxParallel={len(ITEMS)}")
        await wait_until(lambda: _true(len(ledger_lines(self.ledger)) == len(ITEMS)), timeout=60,
                         what="every step running on the agent")
        return run_id

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
async def replicas(cluster: NatsCluster, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Replicas] = []

    async def start_replicas(**kwargs: Any) -> Replicas:
        r = Replicas(cluster, tmp_path)
        started.append(r)
        return await r.start(**kwargs)

    try:
        yield start_replicas
    finally:
        for r in started:
            r.stop()


async def check_outcome(r: Replicas, run_id: str, sessions: list[aiohttp.ClientSession]) -> dict[str, Any]:
    """Every step succeeded on attempt 1, each input set ran once, every output is right, and
    every API replica shows the same run."""
    runs = [await Api(s, None).wait_status(run_id, "complete", timeout=60) for s in sessions]
    run = runs[0]
    assert sorted((s["status"], s["attempt"]) for s in run["steps"]) == [("success", 1)] * len(ITEMS), run["steps"]
    ran = sorted(line.split()[0] for line in ledger_lines(r.ledger))
    assert ran == ITEMS, f"executions per input set: {ran}"
    api = Api(sessions[-1], None)
    results = sorted([(await api.content(u["url"])).decode() for u in run["dataPool"] if u["dataKind"] == "result"])
    assert results == sorted(f"done {i}" for i in ITEMS)

    def view(body: dict[str, Any]) -> Any:
        return (body["status"], sorted((s["id"], s["status"], s["attempt"]) for s in body["steps"]),
                sorted(u["id"] for u in body["dataPool"]))

    assert all(view(other) == view(run) for other in runs[1:]), "the API replicas disagree"
    return run


async def test_an_executor_sigkilled_mid_run_is_taken_over_within_the_ack_wait(
        replicas: Any, cluster_store: EventStore, recovery: Any) -> None:
    ack_wait = ServeSettings().executor_ack_wait  # the deployment's default: what deploy/ runs
    r = await replicas()
    sessions = [aiohttp.ClientSession(url) for _, url in r.apis]
    try:
        for round_no in range(SOAK_ROUNDS):
            await _kill_an_executor_mid_run(r, sessions, cluster_store, recovery, ack_wait, round_no)
            if round_no + 1 < SOAK_ROUNDS:  # a replacement, as the Deployment would start
                await r.spawn_executor().wait_log(lambda q: r.executor_name(q), "executor started", timeout=60)
    finally:
        for s in sessions:
            await s.close()


async def _kill_an_executor_mid_run(r: Replicas, sessions: list[aiohttp.ClientSession], cluster_store: EventStore,
                                    recovery: Any, ack_wait: float, round_no: int) -> None:
    run_id = await r.run_all_gated(Api(sessions[0], None), round_no)
    started = {e.event.step_id: e.envelope.actor for e in await cluster_store.read(run_filter(run_id))
               if isinstance(e.event, StepStarted)}
    names = {r.executor_name(p): p for p in r.executors if p.proc is not None and p.proc.poll() is None}
    holder = max(names, key=lambda n: sum(1 for a in started.values() if a == n))
    taken = {step for step, actor in started.items() if actor == holder}
    victim = names.pop(holder)
    victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    victim.proc.wait(10)  # type: ignore[union-attr]
    killed, killed_mono = datetime.now(timezone.utc), time.monotonic()
    r.gate.touch()  # every attempt finishes on the agent now; the dead executor's wait there

    run = await check_outcome(r, run_id, sessions)
    completed = time.monotonic() - killed_mono
    succeeded = {e.event.step_id: e for e in await cluster_store.read(run_filter(run_id))
                 if isinstance(e.event, StepSucceeded)}
    assert {succeeded[s].envelope.actor for s in taken} <= set(names), "a step not taken over"
    takeover = max((succeeded[s].envelope.time - killed).total_seconds() for s in taken)
    bound = ack_wait + TAKEOVER_MARGIN
    assert takeover < bound < OLD_ACK_WAIT, f"took {takeover:.1f} s (bound {bound:.1f} s)"
    for p in names.values():  # the survivors re-attached to the attempts, never started one
        attached = {rec.get("step_id") for rec in p.json_lines() if rec.get("message") == "re-attaching step"}
        assert not attached & started.keys() - taken, "a survivor re-attached its own step"
    attached = {rec.get("step_id") for p in names.values() for rec in p.json_lines()
                if rec.get("message") == "re-attaching step"}
    assert taken <= attached, (taken, attached)
    counts = deploy_replicas()
    rounds = f", round {round_no + 1} of {SOAK_ROUNDS}" if SOAK_ROUNDS > 1 else ""
    recovery.record(f"executor SIGKILLed ({len(taken)} of {len(ITEMS)} steps held; deploy replicas "
                    f"api {counts['api,projector']}, solver {counts['solver,webhooks']}, executor {counts['executor']}"
                    f"{rounds})",
                    takeover, what=f"the survivor's last StepSucceeded of a taken-over step (ack-wait {ack_wait:g} s)",
                    executions=len(ledger_lines(r.ledger)), input_sets=len(ITEMS), run_complete_s=round(completed, 2))
    assert len(run["steps"]) == len(ITEMS)


async def test_an_api_replica_whose_nats_node_dies_keeps_up(
        replicas: Any, cluster: NatsCluster, recovery: Any) -> None:
    """API replica 1 is given only node n1 (as a Deployment is given one Service name); n1 is
    SIGKILLed mid-run. The replica reconnects to another node (learnt from the cluster): its
    ``/healthz`` position reaches the completed run's within seconds of the other replica's (the
    rest of the time is the cluster's own recovery, which the run waits for), and it serves the
    same final run."""
    n1 = cluster.node("n1")
    r = await replicas(api_nodes=[n1])
    sessions = [aiohttp.ClientSession(url) for _, url in r.apis]
    try:
        first = Api(sessions[0], None)
        run_id = await r.run_all_gated(Api(sessions[-1], None))

        async def health(api: Api) -> dict[str, Any] | None:
            try:
                status, body = await api.call("GET", "/healthz")
            except aiohttp.ClientError:
                return None
            return body if status == 200 else None

        before = await wait_until(lambda: health(first), what="API replica 1 healthy")
        cluster.kill(n1)
        killed = time.monotonic()
        r.gate.touch()  # the run goes on: its events appended through the other nodes
        second = Api(sessions[-1], None)
        await second.wait_status(run_id, "complete", timeout=60)
        head = (await wait_until(lambda: health(second), timeout=30, what="API replica 2 healthy"))["position"]
        other = time.monotonic() - killed

        async def caught_up() -> dict[str, Any] | None:
            body = await health(first)
            return body if body and body["position"] >= head else None

        after = await wait_until(caught_up, timeout=30, what=f"API replica 1's position to reach {head}")
        took = time.monotonic() - killed
        await check_outcome(r, run_id, sessions)
        assert after["position"] > before["position"]
        # not frozen: a reconnect and a recreated ordered consumer (two missed 1 s heartbeats)
        assert took - other < CATCH_UP_BOUND, f"replica 1 caught up {took - other:.1f} s after replica 2"
        recovery.record("NATS node of an API replica SIGKILLed", took,
                        what="the replica's /healthz position reaching the completed run's",
                        position_before=before["position"], position_after=after["position"],
                        other_replica_complete_s=round(other, 2), behind_the_other_s=round(took - other, 2),
                        executions=len(ledger_lines(r.ledger)), input_sets=len(ITEMS))
    finally:
        for s in sessions:
            await s.close()


async def _true(value: Any) -> Any:
    return value
