"""Runs executing for real: operators are small Python scripts run by a machine agent, steps go
through the real executor, solver and projection over HTTP.

Covered here (and nowhere else): a failing operator next to succeeding branches, ``spec.retries``
and ``spec.timeoutSeconds``, terminate with and without ``cancel``, delete after terminate, the
per-run ``maxParallel`` limit, an unreachable machine, and crash recovery of an executor process
(the step is re-attached on the agent, not run twice).

The operator scripts block on files the test creates (never on time), so each test decides when a
step may finish; every wait is a wait on a condition with a timeout.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_helpers import clean_env, pid_gone
from mlynar_events.events import (
    RunTerminated, RunTerminationRequested, StepAttemptFailed, StepFailed, StepScheduled, StepSucceeded,
    StepCancelled,
)
from support import Api, REPO, json_records, wait_until

KIND = "number-array-json"

# Prepended to every operator script: wait for a file (polling; the test creates it) and write
# outputs with their manifest.
PRELUDE = '''\
import json, os, pathlib, sys, time

def wait_for(path, limit=60.0, poll=0.02):  # the operator polls for a file the test creates
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit("gave up waiting for " + path)
        time.sleep(poll)

def outputs(*outs):
    out = pathlib.Path(os.environ["MLYNAR_OUTPUT_DIR"])
    manifest = []
    for kind, name, text in outs:
        (out / name).write_text(text)
        manifest.append({"dataKind": kind, "file": name})
    (out / "mlynar-out.json").write_text(json.dumps({"outputs": manifest}))

def touch(path, text=""):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # appears whole
'''


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(PRELUDE + body)
    return path


def operator(name: str, path: Path, *, machine: str = "local", inputs: list[tuple[str, str]] = (),
             outputs: list[str] = (), env: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator", "metadata": {"name": name}, "spec": {
        "machine": machine, "command": [sys.executable, str(path)],
        "inputs": [{"fileLocationEnv": e, "dataKind": k} for e, k in inputs],
        "possibleOutputKinds": list(outputs),
        "constantEnv": [{"name": k, "value": v} for k, v in (env or {}).items()],
        **spec}}


async def declare(api: Api, *docs: dict[str, Any]) -> None:
    for doc in docs:
        path = "/api/operators" if doc.get("kind") == "Operator" else "/api/data-kinds"
        status, body = await api.call("POST", path, json=doc)
        assert status in (200, 201), body


def data_kind(name: str) -> dict[str, Any]:
    return {"apiVersion": "mlynar.dev/v1alpha1", "kind": "DataKind", "metadata": {"name": name}}


async def start(api: Api, run_id: str, query: str = "", body: Any = None) -> dict[str, Any]:
    status, run = await api.call("POST", f"/api/run/{run_id}/run{query}", json=body or {})
    assert status == 200, run
    return run


def steps_of(run: dict[str, Any], op: str) -> list[dict[str, Any]]:
    return [s for s in run["steps"] if s["operator"] == op]


async def wait_step(api: Api, run_id: str, op: str, *statuses: str, timeout: float = 20.0) -> dict[str, Any]:
    """The (single) step of ``op`` once its status is one of ``statuses``."""
    async def check() -> dict[str, Any] | None:
        found = steps_of(await api.run(run_id), op)
        return found[0] if found and found[0]["status"] in statuses else None

    return await wait_until(check, timeout, what=f"step {op} of run {run_id} to be {statuses}")


async def history(api: Api, run_id: str) -> list[Any]:
    events, _ = await api.service.store.load_run(run_id)
    return events


async def wait_event(api: Api, run_id: str, cls: type, timeout: float = 20.0) -> Any:
    async def seen() -> Any:
        return next((e for e in await history(api, run_id) if isinstance(e.event, cls)), None)

    return await wait_until(seen, timeout, what=f"{cls.__name__} in run {run_id}")


async def logs(api: Api, run_id: str, step_id: str, query: str = "") -> str:
    async with api.http.get(f"/api/run/{run_id}/steps/{step_id}/logs{query}") as r:
        text = await r.text()
        assert r.status == 200, text
        return text


async def assert_deleted(api: Api, run_id: str, unit_urls: list[str] = ()) -> None:
    status, body = await api.call("DELETE", f"/api/run/{run_id}")
    assert status == 200, body
    status, body = await api.call("GET", f"/api/run/{run_id}")
    assert status == 404 and body["error"]
    for url in unit_urls:
        async with api.http.get(url) as r:
            assert r.status == 404
    assert not (api.service.settings.resolved_blob_dir / "runs" / run_id).exists()


# ---- 1. a failing operator ----------------------------------------------------------------------


async def test_failing_step_does_not_stop_the_other_branches(api: Api) -> None:
    run_id = await api.create_run()
    assert (await api.upload(run_id, "fail-input", b"anything"))[0] == 201
    assert (await api.upload(run_id, KIND, b"[1,2,3]"))[0] == 201
    await start(api, run_id)
    run = await api.wait_status(run_id, "complete")

    assert sorted((s["operator"], s["status"]) for s in run["steps"]) == [
        ("average", "success"), ("fail", "failure"), ("length", "success"), ("sum", "success")]
    assert run["stepCounts"] == {"total": 4, "succeeded": 3, "failed": 1, "cancelled": 0, "active": 0}
    [failed] = steps_of(run, "fail")
    assert failed["error"] and "exit code 3" in failed["error"], failed
    assert failed["logsUrl"].endswith(f"/api/run/{run_id}/steps/{failed['id']}/logs")
    text = await logs(api, run_id, failed["id"])
    assert "fail: refusing to process" in text, text  # what fail.py printed to stderr
    average = next(u for u in run["dataPool"] if u["dataKind"] == "number-array-average-json")
    assert await api.content(average["url"]) == b'{"average":2}'


# ---- 2. retries and timeout ---------------------------------------------------------------------


async def test_retries_until_an_attempt_succeeds(api: Api, tmp_path: Path) -> None:
    marker = tmp_path / "first-attempt-done"
    flaky = script(tmp_path, "flaky", '''
marker = os.environ["MARKER"]
if not os.path.exists(marker):
    touch(marker)
    print("attempt one: failing on purpose", file=sys.stderr)
    sys.exit(7)
print("attempt two: fine", file=sys.stderr)
outputs()
''')
    await declare(api, operator("flaky", flaky, env={"MARKER": str(marker)}, retries=2))
    run_id = await api.create_run()
    await start(api, run_id)  # a zero-input operator runs once per started run
    run = await api.wait_status(run_id, "complete")

    [step] = steps_of(run, "flaky")
    assert (step["status"], step["attempt"]) == ("success", 2), step
    events = await history(api, run_id)
    failed_attempts = [e.event for e in events if isinstance(e.event, StepAttemptFailed)]
    assert [(a.step_id, a.attempt) for a in failed_attempts] == [(step["id"], 1)]
    assert "exit code 7" in failed_attempts[0].error
    assert not [e for e in events if isinstance(e.event, StepFailed)]
    assert len([e for e in events if isinstance(e.event, StepSucceeded)]) == 1
    assert "attempt one: failing on purpose" in await logs(api, run_id, step["id"], "?attempt=1")
    assert "attempt two: fine" in await logs(api, run_id, step["id"])
    assert run["stepCounts"]["succeeded"] == 1 and run["stepCounts"]["failed"] == 0


async def test_timeout_fails_the_step(api: Api, tmp_path: Path) -> None:
    sleeper = script(tmp_path, "sleeper", '''
print("sleeping", flush=True)
wait_for(os.environ["NEVER"])
outputs()
''')
    await declare(api, operator("sleeper", sleeper, env={"NEVER": str(tmp_path / "never")}, timeoutSeconds=1))
    run_id = await api.create_run()
    await start(api, run_id)
    run = await api.wait_status(run_id, "complete")
    [step] = steps_of(run, "sleeper")
    assert step["status"] == "failure", step
    assert "timed out after 1 s" in step["error"], step["error"]
    assert "sleeping" in await logs(api, run_id, step["id"])
    assert run["stepCounts"]["failed"] == 1


# ---- 3. terminate, with and without cancel, then delete -----------------------------------------


async def test_terminate_lets_the_running_step_finish_then_delete(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    slow = script(tmp_path, "slow", '''
gate = os.environ["GATE"]
touch(os.path.join(gate, "started"))
wait_for(os.path.join(gate, "release"))
outputs(("slow-out", "result.txt", "slow result"))
''')
    after = script(tmp_path, "after", 'outputs()\n')
    await declare(api, data_kind("slow-out"), operator("slow", slow, outputs=["slow-out"], env={"GATE": str(gate)}),
                  operator("after", after, inputs=[("IN", "slow-out")]))
    run_id = await api.create_run()
    await start(api, run_id)
    await wait_until(lambda: _exists(gate / "started"), what="the slow step to start")
    await wait_step(api, run_id, "slow", "running")

    status, run = await api.call("POST", f"/api/run/{run_id}/terminate")
    assert status == 200, run
    assert run["status"] == "terminated"
    (gate / "release").touch()
    await wait_step(api, run_id, "slow", "success")
    terminated = await wait_event(api, run_id, RunTerminated)

    run = await api.run(run_id)
    assert run["status"] == "terminated"
    # the output is in the pool, so `after` could run; it was never scheduled
    [unit] = [u for u in run["dataPool"] if u["dataKind"] == "slow-out"]
    assert await api.content(unit["url"]) == b"slow result"
    assert [s["operator"] for s in run["steps"]] == ["slow"]
    events = await history(api, run_id)
    request = next(e for e in events if isinstance(e.event, RunTerminationRequested))
    assert not request.event.cancel
    assert [e.event.operator for e in events if isinstance(e.event, StepScheduled)] == ["slow"]
    assert terminated.seq > next(e.seq for e in events if isinstance(e.event, StepSucceeded))
    assert run["stepCounts"] == {"total": 1, "succeeded": 1, "failed": 0, "cancelled": 0, "active": 0}

    await assert_deleted(api, run_id, [unit["url"]])


async def test_terminate_with_cancel_kills_the_step(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    stuck = script(tmp_path, "stuck", '''
gate = os.environ["GATE"]
print("stuck: started", flush=True)
touch(os.path.join(gate, "pid"), str(os.getpid()))
wait_for(os.path.join(gate, "never"))
outputs()
''')
    await declare(api, data_kind("inert"), operator("stuck", stuck, env={"GATE": str(gate)}))
    run_id = await api.create_run()
    _, unit = await api.upload(run_id, "inert", b"no operator takes this")
    await start(api, run_id)
    await wait_until(lambda: _exists(gate / "pid"), what="the stuck step to start")
    pid = int((gate / "pid").read_text())
    assert not pid_gone(pid)
    step = await wait_step(api, run_id, "stuck", "running")

    status, run = await api.call("POST", f"/api/run/{run_id}/terminate?cancel=true")
    assert status == 200, run
    assert run["status"] == "terminated"
    step = await wait_step(api, run_id, "stuck", "cancelled")
    await wait_until(lambda: _true(pid_gone(pid)), what=f"process {pid} of the cancelled step to be gone")
    await wait_event(api, run_id, RunTerminated)
    events = await history(api, run_id)
    assert [e.event.step_id for e in events if isinstance(e.event, StepCancelled)] == [step["id"]]
    assert not [e for e in events if isinstance(e.event, StepFailed) and e.event.step_id == step["id"]]
    run = await api.run(run_id)
    assert run["status"] == "terminated"
    assert run["stepCounts"]["cancelled"] == 1 and run["stepCounts"]["active"] == 0
    await assert_deleted(api, run_id, [unit["url"]])


async def test_cancelled_step_keeps_its_logs(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    stuck = script(tmp_path, "stuck", '''
print("stuck: started", flush=True)
touch(os.path.join(os.environ["GATE"], "started"))
wait_for(os.path.join(os.environ["GATE"], "never"))
''')
    await declare(api, operator("stuck", stuck, env={"GATE": str(gate)}))
    run_id = await api.create_run()
    await start(api, run_id)
    await wait_until(lambda: _exists(gate / "started"), what="the stuck step to start")
    step = await wait_step(api, run_id, "stuck", "running")
    assert (await api.call("POST", f"/api/run/{run_id}/terminate?cancel=true"))[0] == 200
    await wait_step(api, run_id, "stuck", "cancelled")
    status, body = await api.call("GET", f"/api/run/{run_id}/steps/{step['id']}/logs")
    assert status == 200, body
    assert "stuck: started" in body


async def test_delete_while_a_step_still_runs_leaves_no_blobs(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    slow = script(tmp_path, "slow", '''
touch(os.path.join(os.environ["GATE"], "started"))
wait_for(os.path.join(os.environ["GATE"], "release"))
print("finished", flush=True)
outputs(("slow-out", "result.txt", "slow result"))
''')
    await declare(api, data_kind("slow-out"), operator("slow", slow, outputs=["slow-out"], env={"GATE": str(gate)}))
    run_id = await api.create_run()
    await start(api, run_id)
    await wait_until(lambda: _exists(gate / "started"), what="the slow step to start")
    step = await wait_step(api, run_id, "slow", "running")
    # the executor's scratch directory of the attempt lives until it is completely handled
    scratch = api.service.settings.data_dir / "executor" / f"{step['id']}-1"
    assert scratch.exists()
    assert (await api.call("POST", f"/api/run/{run_id}/terminate"))[0] == 200
    await assert_deleted(api, run_id)
    (gate / "release").touch()
    await wait_until(lambda: _true(not scratch.exists()), what="the executor to be done with the step")
    leftovers = sorted(str(p) for p in (api.service.settings.resolved_blob_dir / "runs" / run_id).rglob("*"))
    assert not leftovers


# ---- 4. maxParallel -----------------------------------------------------------------------------


async def test_max_parallel_holds_steps_back(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    block = script(tmp_path, "block", '''
gate = os.environ["GATE"]
n = pathlib.Path(os.environ["ITEM"]).read_text().strip()
touch(os.path.join(gate, "started-" + n))
wait_for(os.path.join(gate, "release-" + n))
touch(os.path.join(gate, "done-" + n))
outputs()
''')
    await declare(api, data_kind("item"), operator("block", block, inputs=[("ITEM", "item")], env={"GATE": str(gate)}))
    run_id = await api.create_run()
    for n in range(6):
        assert (await api.upload(run_id, "item", str(n).encode()))[0] == 201
    run = await start(api, run_id, "?maxParallel=2")
    assert run["maxParallel"] == 2

    def marks(prefix: str) -> set[str]:
        return {p.name.split("-", 1)[1] for p in gate.glob(prefix + "-*") if not p.name.endswith(".tmp")}

    running_seen: list[int] = []
    released: set[str] = set()
    while len(released) < 6:
        expected = min(2, 6 - len(released))

        async def blocked() -> set[str] | None:
            running = [s for s in (await api.run(run_id))["steps"] if s["status"] == "running"]
            running_seen.append(len(running))
            assert len(running) <= 2, running
            waiting = marks("started") - released
            assert len(waiting) <= 2, waiting  # never more than two processes at once
            return waiting if len(waiting) == expected and len(running) == expected else None

        waiting = await wait_until(blocked, what=f"{expected} blocked steps ({len(released)} released)")
        n = sorted(waiting)[0]
        released.add(n)
        (gate / f"release-{n}").touch()

    run = await api.wait_status(run_id, "complete")
    assert sorted(s["status"] for s in run["steps"]) == ["success"] * 6
    assert marks("done") == {str(n) for n in range(6)}
    assert max(running_seen) == 2
    # and in the history: never more than two steps scheduled and not finished
    active: set[str] = set()
    peak = 0
    for e in await history(api, run_id):
        if isinstance(e.event, StepScheduled):
            active.add(e.event.step_id)
            peak = max(peak, len(active))
        elif isinstance(e.event, (StepSucceeded, StepFailed, StepCancelled)):
            active.discard(e.event.step_id)
    assert peak == 2


# ---- 5. an unreachable machine ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_machine_fails_the_step(api: Api, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    status, body = await api.call("POST", "/api/machines", json={"name": "nowhere", "url": url, "token": "t0ken"})
    assert status == 201, body
    never = script(tmp_path, "never", 'touch(os.environ["RAN"])\noutputs()\n')
    ran = tmp_path / "ran"
    await declare(api, operator("remote-op", never, machine="nowhere", env={"RAN": str(ran)}))
    run_id = await api.create_run()
    await start(api, run_id)
    # an unreachable agent is the infrastructure's failure: retried up to the executor's cap
    # (tests/faults covers the cap and the records), then the step fails saying why
    run = await api.wait_status(run_id, "complete", timeout=60)
    [step] = steps_of(run, "remote-op")
    assert step["status"] == "failure", step
    error = step["error"]
    assert "'nowhere'" in error and url in error and "cannot connect" in error, error
    assert step["target"] == "machine:nowhere"
    assert not ran.exists()


# ---- 6. crash recovery with real processes ------------------------------------------------------


MLYNAR = [str(Path(sys.executable).parent / "mlynar")] if (Path(sys.executable).parent / "mlynar").exists() \
    else [sys.executable, "-m", "mlynar_events.cli"]


class Proc:
    """A child process with its stdout+stderr in a file; stopped (TERM, then KILL) by ``stop``."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name, self.argv = name, argv
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def json_lines(self) -> list[dict[str, Any]]:
        return json_records(self.text())

    async def wait_log(self, predicate: Any, what: str, timeout: float = 20.0) -> Any:
        async def check() -> Any:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            return predicate(self)

        return await wait_until(check, timeout, interval=0.05, what=f"{self.name}: {what}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serving_url(p: Proc) -> str | None:
    return next((r["api"] for r in p.json_lines() if r.get("message") == "mlynar serving" and r.get("api")), None)


def logged(message: str):  # type: ignore[no-untyped-def]
    return lambda p: any(r.get("message") == message for r in p.json_lines())


@pytest.fixture
def procs(tmp_path: Path, nats_url: str):  # type: ignore[no-untyped-def]
    """Start ``mlynar`` child processes; all stopped at teardown (before the NATS server)."""
    started: list[Proc] = []
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    def spawn(name: str, *args: str) -> Proc:
        p = Proc(name, [*MLYNAR, *args], log_dir).start()
        started.append(p)
        return p

    spawn.started = started  # type: ignore[attr-defined]
    try:
        yield spawn
    finally:
        for p in reversed(started):
            p.stop()


async def _split_roles(nats_url: str, procs: Any, tmp_path: Path, ack_wait: str) -> tuple[Any, Any, Any, list[str]]:
    """API+solver, an agent and a first executor as separate processes, and a run of the
    operator ``once`` (it appends to a ledger per real execution, then waits for a gate) with
    its step running on the agent. Returns (api client session, first executor, the running
    step, the executor's arguments); the caller closes the session."""
    import aiohttp

    blobs = tmp_path / "blobs"
    common = ["--nats-url", nats_url, "--no-local-machine", "--blob-dir", str(blobs), "--log-format", "json",
              "--log-level", "INFO"]
    api_proc = procs("api", "serve", "--roles", "api,projector,solver", "--port", "0",
                     "--data-dir", str(tmp_path / "api-data"), *common)
    token_file = tmp_path / "agent-token"
    token_file.write_text("agent-secret-token\n")
    # the operator is this test's script run by this test's interpreter, as the test's user: unconfined
    agent = procs("agent", "machine-agent", "--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file),
                  "--work-dir", str(tmp_path / "agent-work"), "--isolation", "none", "--run-as-user", "")
    executor_args = ["serve", "--roles", "executor", "--executor-ack-wait", ack_wait, *common]
    first = procs("executor-1", *executor_args, "--data-dir", str(tmp_path / "exec-1"))

    api_url = await api_proc.wait_log(serving_url, "API listening")
    agent_url = (await agent.wait_log(lambda p: _agent_url(p.text()), "agent listening"))
    await first.wait_log(logged("executor started"), "executor started")

    once = script(tmp_path, "once", '''
with open(os.environ["LEDGER"], "a") as f:
    f.write(f"ran as {os.getpid()}\\n")
wait_for(os.environ["GATE"])
outputs(("once-out", "out.txt", "ran once"))
''')
    http = aiohttp.ClientSession(api_url)
    api = Api(http, None)
    status, body = await api.call("POST", "/api/machines", json={
        "name": "remote", "url": agent_url, "token": "agent-secret-token"})
    assert status == 201, body
    await declare(api, data_kind("once-out"),
                  operator("once", once, machine="remote", outputs=["once-out"],
                           env={"LEDGER": str(tmp_path / "ledger.txt"), "GATE": str(tmp_path / "release")}))
    run_id = await api.create_run()
    await start(api, run_id)
    await wait_until(lambda: _lines(tmp_path / "ledger.txt", 1), what="the step to start on the agent")
    step = await wait_step(api, run_id, "once", "running")
    return api, first, {**step, "run_id": run_id}, executor_args


async def _finish_once(api: Api, tmp_path: Path, step: dict[str, Any]) -> dict[str, Any]:
    """Open the gate; the run completes with the step succeeded on its first attempt, run once."""
    (tmp_path / "release").touch()
    run = await api.wait_status(step["run_id"], "complete", timeout=30)
    [done] = steps_of(run, "once")
    assert done["status"] == "success", done
    assert done["attempt"] == 1
    ledger = (tmp_path / "ledger.txt").read_text()
    assert len(ledger.splitlines()) == 1, ledger
    return run


async def test_executor_crash_reattaches_the_step(nats_url: str, procs: Any, tmp_path: Path) -> None:
    api, first, step, executor_args = await _split_roles(nats_url, procs, tmp_path, ack_wait="2")
    async with api.http:
        first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        first.proc.wait(10)  # type: ignore[union-attr]
        second = procs("executor-2", *executor_args, "--data-dir", str(tmp_path / "exec-2"))
        # the redelivered step (after ack-wait) is re-attached on the agent under the same id:
        # found there, so neither its inputs nor its manifest are sent again
        await second.wait_log(logged("re-attaching step"), "the step re-attached", timeout=30)
        await second.wait_log(lambda p: any(r.get("message") == "attempt exists on the agent; attaching"
                                            and r.get("external_id") == f"{step['id']}-1" for r in p.json_lines()),
                              "the agent's step of the same machine step id found")
        run = await _finish_once(api, tmp_path, step)
        [unit] = [u for u in run["dataPool"] if u["dataKind"] == "once-out"]
        assert await api.content(unit["url"]) == b"ran once"
        assert run["stepCounts"] == {"total": 1, "succeeded": 1, "failed": 0, "cancelled": 0, "active": 0}
        started = [r for r in second.json_lines() if r.get("message") == "re-attaching step"]
        assert {r.get("step_id") for r in started} == {step["id"]}
        assert not any(r.get("message") == "starting step" for r in second.json_lines())


async def test_graceful_stop_hands_the_step_back_at_once(nats_url: str, procs: Any, tmp_path: Path) -> None:
    """SIGTERM drains: the stopping executor naks its in-flight step, so the next executor takes
    it now. With an ack-wait of 10 minutes, a step left to redelivery would outlast this test."""
    api, first, step, executor_args = await _split_roles(nats_url, procs, tmp_path, ack_wait="600")
    async with api.http:
        first.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert first.proc.wait(30) == 0  # type: ignore[union-attr]
        assert logged("handing the step back on shutdown")(first)
        second = procs("executor-2", *executor_args, "--data-dir", str(tmp_path / "exec-2"))
        await second.wait_log(logged("re-attaching step"), "the handed-back step re-attached", timeout=30)
        await _finish_once(api, tmp_path, step)


def _agent_url(text: str) -> str | None:
    for line in text.splitlines():
        if "listening on " in line and line.startswith("mlynar machine-agent"):
            return line.rsplit("listening on ", 1)[1].strip()
    return None


async def _exists(path: Path) -> bool:
    return path.exists()


async def _true(value: Any) -> Any:
    return value


async def _lines(path: Path, n: int) -> bool:
    return path.exists() and len(path.read_text().splitlines()) >= n

