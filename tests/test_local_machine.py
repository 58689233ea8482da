"""The built-in machine ``local`` takes the --local-* settings: isolation and an allow list."""

from __future__ import annotations

import shutil
from urllib.parse import urlsplit

import pytest

from mlynar_events.serve import KEYS_DIR
from support import Api

KIND = "number-array-json"


def operator(name: str, command: list[str]) -> dict:
    return {"apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator", "metadata": {"name": name},
            "spec": {"machine": "local", "command": command, "inputs": [{"fileLocationEnv": "IN", "dataKind": KIND}],
                     "possibleOutputKinds": []}}


async def run_one(api: Api, op: dict) -> dict:
    for name in ("sum", "length", "average"):  # only this test's operator consumes the kind
        assert (await api.call("DELETE", f"/api/operators/{name}"))[0] == 200
    assert (await api.call("POST", "/api/operators", json=op))[0] == 201
    run_id = await api.create_run()
    assert (await api.upload(run_id, KIND, b"[1]"))[0] == 201
    assert (await api.call("POST", f"/api/run/{run_id}/run", json={}))[0] == 200
    run = await api.wait_status(run_id, "complete")
    [step] = run["steps"]
    return step


async def logs(api: Api, step: dict) -> str:
    async with api.http.get(urlsplit(step["logsUrl"]).path) as r:
        return await r.text()


async def test_local_allow_refuses_other_commands(make_service) -> None:
    api = await make_service(local_allow=["true"])
    step = await run_one(api, operator("shell", ["sh", "-c", "echo ran"]))
    assert step["status"] == "failure" and "not allowed" in step["error"], step
    assert step["attempt"] == 1  # refused for good: not retried


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (.ci/run installs it)")
async def test_an_isolated_local_step_cannot_read_the_service_keys(make_service) -> None:
    api = await make_service(local_isolation="bwrap")
    keys = api.service.settings.data_dir / KEYS_DIR
    secret_files = [p for p in keys.iterdir() if p.is_file()] if keys.exists() else []
    target = secret_files[0] if secret_files else api.service.settings.resolved_db_path
    step = await run_one(api, operator("peek", ["cat", str(target)]))
    assert step["status"] == "failure"
    text = await logs(api, step)
    assert "No such file" in text, text
    if secret_files:
        assert target.read_text()[:12] not in text
