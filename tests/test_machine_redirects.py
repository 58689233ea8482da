"""A machine agent is not trusted to point the service elsewhere: its redirects are not followed.

The attacker here registered a machine whose "agent" answers the output download with a redirect
to an internal address; following it would make the service fetch that address and store the
answer as a data unit anyone with the run can read."""

from __future__ import annotations

import hashlib
from typing import AsyncIterator

import pytest
from aiohttp import web

from support import Api, serving

KIND = "number-array-json"
SECRET = b"INTERNAL-ONLY-SECRET"


@pytest.fixture
async def internal() -> AsyncIterator[tuple[str, list[str]]]:
    """An internal service the attacker wants read: it records every request it gets."""
    hits: list[str] = []

    async def secret(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=SECRET)

    app = web.Application()
    app.router.add_get("/internal-secret", secret)
    async with serving(app) as base:
        yield f"{base}/internal-secret", hits


@pytest.fixture
async def hostile_agent(internal: tuple[str, list[str]]) -> AsyncIterator[str]:
    """Speaks just enough of the agent protocol: the step 'succeeds' with one output, whose
    download is a redirect (and so are its logs)."""
    target, _ = internal
    digest = hashlib.sha256(SECRET).hexdigest()

    def status(step_id: str) -> dict:
        return {"id": step_id, "state": "succeeded", "exitCode": 0, "retryable": True, "outputs": [
            {"index": 0, "dataKind": "number-array-sum-json", "file": "out/sum.json", "size": len(SECRET),
             "sha256": digest}]}

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def put_step(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(status(request.match_info["id"]), status=202)

    async def get_step(request: web.Request) -> web.Response:
        return web.json_response(status(request.match_info["id"]))

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(target)

    async def delete(request: web.Request) -> web.Response:
        return web.json_response({"deleted": True})

    app = web.Application()
    app.router.add_get("/v1/healthz", healthz)
    app.router.add_put("/v1/steps/{id}", put_step)
    app.router.add_get("/v1/steps/{id}", get_step)
    app.router.add_delete("/v1/steps/{id}", delete)
    app.router.add_get("/v1/steps/{id}/outputs/{n}", redirect)
    app.router.add_get("/v1/steps/{id}/logs", redirect)
    async with serving(app) as base:
        yield base


async def test_an_agents_redirect_is_not_followed(api: Api, hostile_agent: str, internal) -> None:
    _, hits = internal
    status, body = await api.call("POST", "/api/machines", json={"name": "hostile", "url": hostile_agent,
                                                                 "token": "t" * 32})
    assert status == 201, body
    op = {"apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator", "metadata": {"name": "stealer"},
          "spec": {"machine": "hostile", "command": ["true"], "inputs": [{"fileLocationEnv": "IN", "dataKind": KIND}],
                   "possibleOutputKinds": ["number-array-sum-json"]}}
    for name in ("sum", "length", "average"):
        assert (await api.call("DELETE", f"/api/operators/{name}"))[0] == 200
    assert (await api.call("POST", "/api/operators", json=op))[0] == 201
    run_id = await api.create_run()
    assert (await api.upload(run_id, KIND, b"[1]"))[0] == 201
    assert (await api.call("POST", f"/api/run/{run_id}/run", json={}))[0] == 200
    run = await api.wait_status(run_id, "complete", timeout=60)
    [step] = run["steps"]
    assert step["status"] == "failure" and "redirect" in (step["error"] or ""), step
    assert hits == []  # the internal address was never fetched
    assert [u["dataKind"] for u in run["dataPool"]] == [KIND]  # nothing stored from it
