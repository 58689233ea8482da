"""Every executor replica runs the built-in machine `local` on its own agent (issue: the last
replica to start took everyone's steps, and lost them when it died)."""

from __future__ import annotations

from pathlib import Path

from mlynar_events.events import SUBJECT_PREFIX, MachineRegistered, MachineUpdated, key_filter
from support import Api


async def test_a_dead_replicas_local_agent_takes_no_steps(make_service, tmp_path: Path) -> None:
    survivor = await make_service(data_dir=tmp_path / "a")
    other = await make_service(data_dir=tmp_path / "b")  # registers `local` last: its agent's URL
    entries = await survivor.service.store.read(key_filter("machine", "local"))
    last = entries[-1].event
    assert isinstance(last, (MachineRegistered, MachineUpdated))
    await other.http.close()
    await other.service.stop()  # its agent is gone; the registry still names it

    run_id = await survivor.create_run()
    for n in range(4):
        assert (await survivor.upload(run_id, "number-array-json", f"[{n},1]".encode()))[0] == 201
    assert (await survivor.call("POST", f"/api/run/{run_id}/run", json={}))[0] == 200
    run = await survivor.wait_status(run_id, "complete", timeout=60)
    assert run["stepCounts"]["succeeded"] == run["stepCounts"]["total"] > 0, run["stepCounts"]
    failures = [e for e in await survivor.service.store.read(f"{SUBJECT_PREFIX}.run.{run_id}.>")
                if e.event.event_type in ("StepAttemptFailed", "StepFailed")]
    assert failures == []  # not even a retried attempt: the dead agent was never called
