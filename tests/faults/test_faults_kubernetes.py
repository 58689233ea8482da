"""A Kubernetes attempt lost to the API while its Job keeps running (the API answers 500 until
the watch gives up, and still while the lost attempt is released, so its Job survives that): the
attempt is retried without using ``retries``, and the next attempt removes the running Job of
the lost one before creating its own, so the operator never runs in two Jobs at once. Against
the Kubernetes API stand-in (tests/kube_fake.py), the real service."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kube_fake import FakeKube
from mlynar_events.events import StepAttemptFailed, StepFailed
from support import wait_until
from test_kubernetes import OPS, Gate, declare, gate, kube, kube_settings, one_step_run, operator, operator_running  # noqa: F401


async def test_a_lost_attempts_running_job_is_removed_before_the_next_attempt_starts(
        kube: Any, fake: FakeKube, gate: Gate, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING, "mlynar.executor.kubernetes")
    api = await kube()
    await declare(api, operator("gated", args=[str(OPS), "gate", str(gate.path)], inputs=[("INPUT_ARRAY", "number-array-json")],
                                outputs=["number-array-sum-json"], retries=0))
    for name in ("sum", "length", "average"):  # only the gated operator consumes this kind
        assert (await api.call("DELETE", f"/api/operators/{name}"))[0] == 200
    run_id, _ = await one_step_run(api, "number-array-json", b"[1,2,3]")
    await wait_until(lambda: operator_running(fake), what="attempt 1's operator container to run")
    [first_job] = [name for (plural, name) in fake.created if plural == "jobs"]

    async def history(cls: type) -> list[Any]:
        events, _ = await api.service.store.load_run(run_id)
        return [e.event for e in events if isinstance(e.event, cls)]

    fake.fail_with = 500  # the API server fails; the Job itself goes on running
    await fake.drop_watches()
    await wait_until(lambda: history(StepAttemptFailed), timeout=60, what="attempt 1 lost to the API")

    async def release_failed() -> bool:
        return any(r.getMessage() == "could not clean up" and f"delete job {first_job}" in str(getattr(r, "error", ""))
                   for r in caplog.records)

    await wait_until(release_failed, timeout=60, what="the release of attempt 1 to fail too")
    assert fake.get("jobs", first_job) is not None  # still there, still running
    fake.fail_with = None
    await wait_until(lambda: _async(len([n for (p, n) in fake.created if p == "jobs"]) == 2), timeout=30,
                     what="attempt 2's job")
    assert fake.get("jobs", first_job) is None, "attempt 2's Job was created while attempt 1's still ran"
    gate.open()
    run = await api.wait_status(run_id, "complete", timeout=60)
    [step] = run["steps"]
    assert (step["status"], step["attempt"]) == ("success", 2), step
    [lost] = await history(StepAttemptFailed)
    assert lost.infrastructure and lost.attempt == 1, lost
    assert not await history(StepFailed)
    sums = [u for u in run["dataPool"] if u["dataKind"] == "number-array-sum-json"]
    assert len(sums) == 1 and await api.content(sums[0]["url"]) == b'{"sum":6}'


async def _async(value: Any) -> Any:
    return value
