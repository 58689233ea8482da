"""``audit verify``: a clean history passes; a tampered projection or a forged decision on the
stream is found, with a message that names it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mlynar_events.audit import check_scheduling
from mlynar_events.events import SUBJECT_PREFIX, DataUnitAdded, StepScheduled
from projections.audit import verify_views
from support import Api, wait_until

KIND = "number-array-json"


async def finished_run(api: Api) -> str:
    run_id = await api.create_run()
    for data in (b"[1,2,3]", b"[4,5]"):  # two uploads: sum and length run twice each, average 4 times
        assert (await api.upload(run_id, KIND, data))[0] == 201
    assert (await api.call("POST", f"/api/run/{run_id}/run", json={}))[0] == 200
    await api.wait_status(run_id, "complete")
    return run_id


async def caught_up(api: Api) -> None:
    head = await api.service.store.last_seq()
    await wait_until(lambda: _at(api, head), what="the live projection at the head")


async def _at(api: Api, head: int) -> bool:
    status, health = await api.call("GET", "/healthz")
    return health.get("position", 0) >= head


async def test_a_clean_history_passes(api: Api, tmp_path: Path) -> None:
    run_id = await finished_run(api)
    events = await api.service.store.read(f"{SUBJECT_PREFIX}.>")
    findings, runs = check_scheduling(events)
    assert findings == [] and runs == 1
    steps = [e.event for e in events if isinstance(e.event, StepScheduled)]
    assert sorted(s.operator for s in steps) == ["average"] * 4 + ["length"] * 2 + ["sum"] * 2
    await caught_up(api)
    found, seq = await verify_views(api.service.store, api.service.settings.resolved_db_path, tmp_path)
    assert found == [] and seq >= events[-1].seq
    assert run_id


async def test_a_tampered_projection_is_found_by_table_row_and_column(api: Api, tmp_path: Path) -> None:
    run_id = await finished_run(api)
    await caught_up(api)
    db = api.service.settings.resolved_db_path
    conn = sqlite3.connect(db)
    step_id = conn.execute("SELECT id FROM steps WHERE run_id = ? AND operator = 'sum' LIMIT 1", (run_id,)).fetchone()[0]
    with conn:
        conn.execute("UPDATE steps SET status = 'failure' WHERE id = ?", (step_id,))
        conn.execute("DELETE FROM data_units WHERE run_id = ? AND step_id IS NULL", (run_id,))
    conn.close()
    found, _ = await verify_views(api.service.store, db, tmp_path)
    messages = [str(f) for f in found]
    assert f"steps row {step_id}: status is 'failure' in the live views but 'success' in the replay" in messages
    assert sum("is missing from the live views" in m and m.startswith("data_units row") for m in messages) == 2


async def test_a_forged_decision_on_the_stream_is_found(api: Api) -> None:
    run_id = await finished_run(api)
    store = api.service.store
    events = await store.read(f"{SUBJECT_PREFIX}.run.{run_id}.>")
    sum_step = next(e.event for e in events if isinstance(e.event, StepScheduled) and e.event.operator == "sum")
    # the same input set again under another id: what a solver race that got through would look like
    forged = sum_step.model_copy(update={"step_id": "forged0000000000000"})
    seq = (await store.append(forged, actor="attacker")).seq
    # a unit claimed by a step whose success did not report it: an attempt's outputs twice
    upload = next(e.event for e in events if isinstance(e.event, DataUnitAdded) and e.event.step_id is None)
    extra = upload.model_copy(update={"unit_id": "extra-unit", "data_kind": "number-array-sum-json",
                                      "step_id": sum_step.step_id, "ancestors": ["sum"]})
    await store.append(extra, actor="attacker")
    findings, _ = check_scheduling(await store.read(f"{SUBJECT_PREFIX}.>"))
    messages = [str(f) for f in findings]
    assert any(m.startswith(f"run {run_id} seq {seq}: step forged0000000000000 (sum): the same input set was "
                            f"already scheduled as step {sum_step.step_id}") for m in messages), messages
    assert any("unit extra-unit of step" in m and "not among the outputs of its success" in m for m in messages)
    # and the set a missing step would leave unscheduled is reported as missing
    assert all("never scheduled" not in m for m in messages)


async def test_a_missing_decision_is_found(api: Api) -> None:
    """A history in which the solver never scheduled one possible input set (the step and what
    followed from it left out of the history the audit reads)."""
    await finished_run(api)
    events = await api.service.store.read(f"{SUBJECT_PREFIX}.>")
    dropped = next(e.event for e in events if isinstance(e.event, StepScheduled) and e.event.operator == "length")
    kept = [e for e in events if getattr(e.event, "step_id", None) != dropped.step_id]
    kept = [e for e in kept if not (isinstance(e.event, StepScheduled) and e.event.operator == "average")]
    findings, _ = check_scheduling(kept)
    missing = [str(f) for f in findings if "never scheduled" in str(f)]
    inputs = {i.env: i.unit_id for i in dropped.inputs}
    assert any(f"operator length was never scheduled for the input set {inputs}" in m for m in missing), missing


def _verify(api: Api, nats_url: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    settings = api.service.settings
    return subprocess.run(
        [sys.executable, "-m", "mlynar_events.cli", "audit", "verify", "--nats-url", nats_url,
         "--data-dir", str(settings.data_dir), "--db-path", str(settings.resolved_db_path)],
        capture_output=True, text=True, timeout=120)


async def test_the_command_passes_a_clean_history_and_fails_a_tampered_one(api: Api, nats_url: str) -> None:
    run_id = await finished_run(api)
    await caught_up(api)
    clean = _verify(api, nats_url)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "audit ok" in clean.stderr and clean.stdout == ""
    conn = sqlite3.connect(api.service.settings.resolved_db_path)
    with conn:
        conn.execute("UPDATE runs SET status = 'running' WHERE id = ?", (run_id,))
    conn.close()
    tampered = _verify(api, nats_url)
    assert tampered.returncode == 1
    assert f"runs row {run_id}: status is 'running' in the live views but 'complete' in the replay" in tampered.stdout
    assert "audit FAILED" in tampered.stderr and "Traceback" not in tampered.stderr
