"""Principals and roles, tried as the people they keep apart would: a viewer who writes, a member
who reaches for another member's run, machine or the registry, a revoked token used again.

Each service here requires tokens (``--api-token-file`` is the bootstrap admin), so the anonymous
loopback mode plays no part; every refusal is checked to have changed nothing."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from api.routes import ROUTES, Access
from mlynar_events.principals import Role, token_digest
from support import Api

ADMIN_TOKEN = "bootstrap-admin-token-of-the-test"
KIND = "number-array-json"
SUM = {"sum": [{"name": "MULTIPLY_BY", "value": "5"}]}


class People:
    """One service and a client per principal."""

    def __init__(self, admin: Api) -> None:
        self.admin = admin
        self.sessions: list[aiohttp.ClientSession] = []
        self.tokens: dict[str, str] = {}

    def as_token(self, token: str | None) -> Api:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = aiohttp.ClientSession(self.admin.service.api_url, headers=headers)
        self.sessions.append(http)
        return Api(http, self.admin.service)

    async def person(self, name: str, role: str) -> Api:
        status, body = await self.admin.call("POST", "/api/tokens", json={"principal": name, "role": role})
        assert status == 201, body
        self.tokens[name] = body["token"]
        return self.as_token(body["token"])


@contextlib.asynccontextmanager
async def people_of(make_service: Callable[..., Awaitable[Api]], tmp_path: Path, **settings: Any
                    ) -> AsyncIterator[People]:
    """A service requiring tokens (``settings`` on top), and a client per principal."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    service_api = await make_service(api_token_file=token_file, **settings)
    p = People(Api(service_api.http, service_api.service))
    p.admin = p.as_token(ADMIN_TOKEN)
    try:
        yield p
    finally:
        for s in p.sessions:
            await s.close()


@pytest.fixture
async def people(make_service: Callable[..., Awaitable[Api]], tmp_path: Path) -> AsyncIterator[People]:
    async with people_of(make_service, tmp_path) as p:
        yield p


async def started_run(api: Api) -> str:
    run_id = await api.create_run()
    assert (await api.upload(run_id, KIND, b"[1,2,3]"))[0] == 201
    status, body = await api.call("POST", f"/api/run/{run_id}/run", json=SUM)
    assert status == 200, body
    return run_id


def filled(path: str) -> str:
    """A route template with dummy values: the role check comes before any lookup."""
    return re.sub(r"\{(\w+)\}", lambda m: "00000000-0000-4000-8000-000000000000" if m[1] == "run_id" else "x", path)


async def test_tokens_are_shown_once_and_only_their_hash_is_kept(people: People) -> None:
    status, body = await people.admin.call("POST", "/api/tokens", json={"principal": "alice", "role": "member",
                                                                        "description": "laptop"})
    assert status == 201 and body["token"].startswith("mlt_") and body["createdBy"] == "admin"
    token = body["token"]
    status, listed = await people.admin.call("GET", "/api/tokens")
    assert status == 200 and [t["principal"] for t in listed] == ["alice"]
    assert token not in json.dumps(listed) and "digest" not in listed[0]
    stored = await people.admin.service.store.read("mlynar.>")
    assert all(token.encode() not in s.envelope.to_bytes() for s in stored)
    assert token_digest(token).encode() in stored[-1].envelope.to_bytes()
    # the token works, as alice
    alice = people.as_token(token)
    run_id = await alice.create_run()
    history = (await people.admin.call("GET", f"/api/run/{run_id}/history"))[1]["events"]
    assert history[0]["actor"] == "alice" and history[0]["data"]["owner"] == "alice"


@pytest.mark.parametrize("bad", [{"principal": "Alice", "role": "member"}, {"principal": "admin", "role": "member"},
                                 {"principal": "bob", "role": "root"}, {"principal": "bob"}, [], None])
async def test_a_bad_token_request_is_refused_and_changes_nothing(people: People, bad: Any) -> None:
    head = await people.admin.service.store.last_seq()
    status, body = await people.admin.call("POST", "/api/tokens", json=bad)
    assert status == 400, body
    assert await people.admin.service.store.last_seq() == head


async def test_each_role_may_call_only_what_it_may(people: People) -> None:
    """Every route of the table, called by a viewer, a member and nobody: writes refused to the
    viewer, the registry, tokens and webhooks refused to the member, everything to no token."""
    viewer, member, nobody = await people.person("vera", "viewer"), await people.person("max", "member"), people.as_token(None)
    head = await people.admin.service.store.last_seq()
    checked = 0
    for route in ROUTES:
        if route.access is not Access.API:
            continue
        path = filled(route.path)
        status, body = await nobody.call(route.method, path)
        assert status == 401, (route.method, route.path, status, body)
        for who, role in ((viewer, Role.VIEWER), (member, Role.MEMBER)):
            if route.path == "/api/events" and role.allows(route.needs):
                continue  # a live stream that never ends: its filtering is the member test below
            status, body = await who.call(route.method, path, json={} if route.method in {"POST", "PUT"} else None)
            if role.allows(route.needs):
                assert status != 403 or "belongs to" in str(body), (role, route.method, route.path, body)
            else:
                assert status == 403 and body["detail"]["needs"] == route.needs.value, (role, route.path, body)
                checked += 1
    assert checked >= 20
    # the viewer wrote nothing; what was written is the member's own allowed calls (POST /api/run)
    written = [s for s in await people.admin.service.store.read("mlynar.>") if s.seq > head]
    assert {s.envelope.actor for s in written} <= {"max"}


async def test_a_member_sees_and_drives_only_its_own_runs(people: People) -> None:
    alice, bob, vera = (await people.person("alice", "member"), await people.person("bob", "member"),
                        await people.person("vera", "viewer"))
    run_id = await started_run(alice)
    done = await alice.wait_status(run_id, "complete")
    unit = done["dataPool"][0]
    head = await people.admin.service.store.last_seq()
    for method, path in [("GET", f"/api/run/{run_id}"), ("GET", f"/api/run/{run_id}?at=1"),
                         ("GET", f"/api/run/{run_id}/params"), ("GET", f"/api/run/{run_id}/history"),
                         ("GET", f"/api/run/{run_id}/events"), ("GET", f"/api/run/{run_id}/lineage"),
                         ("GET", f"/api/run/{run_id}/units/{unit['id']}/provenance"),
                         ("GET", f"/api/run/{run_id}/steps/{done['steps'][0]['id']}"),
                         ("GET", f"/api/run/{run_id}/steps/{done['steps'][0]['id']}/logs"),
                         ("GET", f"/static/{run_id}/data/{unit['id']}"), ("GET", f"/api/run/data-unit/{unit['id']}"),
                         ("POST", f"/api/run/{run_id}/run"), ("POST", f"/api/run/{run_id}/terminate"),
                         ("DELETE", f"/api/run/{run_id}")]:
        status, body = await bob.call(method, path)
        assert status == 404, (method, path, status, body)
        assert "alice" not in json.dumps(body)
    assert (await bob.upload(run_id, KIND, b"[9]"))[0] == 404
    assert await people.admin.service.store.last_seq() == head
    assert [r["id"] for r in (await bob.call("GET", "/api/runs"))[1]] == []
    assert [r["id"] for r in (await alice.call("GET", "/api/runs"))[1]] == [run_id]
    # a viewer and an admin see it, with its owner
    assert (await vera.call("GET", f"/api/run/{run_id}"))[1]["owner"] == "alice"
    assert [(r["id"], r["owner"]) for r in (await people.admin.call("GET", "/api/runs"))[1]] == [(run_id, "alice")]
    # bob's event stream has nothing of alice's run: read it up to bob's own run's creation
    own = await bob.create_run()
    async with bob.http.get("/api/events?after=0", headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 200
        seen: list[dict[str, Any]] = []
        while not any(e.get("subject") == own and e["type"].endswith("RunCreated") for e in seen):
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    assert seen and all(e.get("subject") != run_id for e in seen)
    assert not any(e["type"].endswith(("TokenCreated", "WebhookCreated")) for e in seen)


async def test_a_step_runs_on_a_machine_only_for_its_owner_or_whom_it_is_shared_with(people: People) -> None:
    alice, bob = await people.person("alice", "member"), await people.person("bob", "member")
    # a member may not share the admin's machine, nor share its own with itself as another's
    status, body = await bob.call("PUT", "/api/machines/local", json={"sharedWith": ["bob"]})
    assert status == 403 and "belongs to" in body["error"]
    status, local = await people.admin.call("PUT", "/api/machines/local", json={"sharedWith": ["alice"]})
    assert status == 200 and local["sharedWith"] == ["alice"] and local["owner"] == "serve"
    ok_run, refused_run = await started_run(alice), await started_run(bob)
    ok = await alice.wait_status(ok_run, "complete")
    refused = await bob.wait_status(refused_run, "complete")
    assert {s["status"] for s in ok["steps"]} == {"success"}
    assert refused["steps"] and {s["status"] for s in refused["steps"]} == {"failure"}
    error = refused["steps"][0]["error"]
    assert "belongs to 'serve'" in error and "not shared with 'bob'" in error
    assert refused["steps"][0]["attempt"] == 1  # not retried: no retry can change it
    status, step = await bob.call("GET", f"/api/run/{refused_run}/steps/{refused['steps'][0]['id']}")
    assert status == 200 and all(a["logs_blob"] is None for a in step["attempts"])  # it never ran


async def test_members_register_and_keep_their_own_machines(people: People) -> None:
    alice, bob = await people.person("alice", "member"), await people.person("bob", "member")
    status, m = await alice.call("POST", "/api/machines", json={"name": "alice-laptop", "url": "http://127.0.0.1:9",
                                                               "token": "agent-token"})
    assert status == 201 and m["owner"] == "alice" and m["sharedWith"] == []
    head = await people.admin.service.store.last_seq()
    for method, path, body in [("PUT", "/api/machines/alice-laptop", {"url": "http://127.0.0.1:10", "token": "mine"}),
                               ("PUT", "/api/machines/alice-laptop", {"sharedWith": ["bob"]}),
                               ("DELETE", "/api/machines/alice-laptop", None),
                               ("POST", "/api/machines/alice-laptop/check", None)]:
        status, answer = await bob.call(method, path, json=body)
        assert status == 403 and "belongs to 'alice'" in answer["error"], (method, answer)
    assert await people.admin.service.store.last_seq() == head
    # only an admin shares a machine: the data of the runs it is shared with would go to it, so
    # its owner may not offer it (a member registering a name an operator uses would get others' inputs)
    status, answer = await alice.call("PUT", "/api/machines/alice-laptop", json={"sharedWith": ["bob"]})
    assert status == 403 and "only an admin may share" in answer["error"]
    status, answer = await bob.call("POST", "/api/machines", json={"name": "gpu-box", "url": "http://127.0.0.1:9",
                                                                  "sharedWith": ["*"]})
    assert status == 403 and "only an admin may share" in answer["error"]
    assert await people.admin.service.store.last_seq() == head
    status, m = await people.admin.call("PUT", "/api/machines/alice-laptop", json={"sharedWith": ["bob", "bob"]})
    assert status == 200 and m["sharedWith"] == ["bob"] and m["owner"] == "alice"
    status, m = await alice.call("PUT", "/api/machines/alice-laptop", json={"labels": {"gpu": "no"}})
    assert status == 200 and m["sharedWith"] == ["bob"]  # its owner may change the rest
    status, answer = await people.admin.call("PUT", "/api/machines/alice-laptop", json={"sharedWith": ["Not A Name"]})
    assert status == 400
    assert (await people.admin.call("DELETE", "/api/machines/alice-laptop"))[0] == 200  # an admin may


async def test_a_revoked_token_stops_working_at_once(people: People) -> None:
    alice = await people.person("alice", "member")
    assert (await alice.call("GET", "/api/runs"))[0] == 200
    token_id = (await people.admin.call("GET", "/api/tokens"))[1][0]["id"]
    status, body = await people.admin.call("DELETE", f"/api/tokens/{token_id}")
    assert status == 200 and body["revokedAt"]
    status, body = await alice.call("GET", "/api/runs")
    assert status == 403 and body["error"] == "invalid bearer token"
    assert (await alice.call("POST", "/api/run"))[0] == 403
    assert (await people.admin.call("DELETE", f"/api/tokens/{token_id}"))[0] == 200  # again: no change
    assert (await people.admin.call("DELETE", "/api/tokens/tok-000000000000"))[0] == 404


async def test_an_anonymous_loopback_api_still_checks_a_token_it_is_given(api: Api) -> None:
    """Without a token file the loopback API is anonymous (an admin, as the local user), but a
    bearer token must be valid, and is then who the caller is."""
    status, body = await api.call("POST", "/api/tokens", json={"principal": "alice", "role": "viewer"})
    assert status == 201
    token = body["token"]
    status, _ = await api.call("POST", "/api/run", headers={"Authorization": "Bearer mlt_wrong"})
    assert status == 403
    status, body = await api.call("POST", "/api/run", headers={"Authorization": f"Bearer {token}"})
    assert status == 403 and body["detail"] == {"principal": "alice", "role": "viewer", "needs": "member"}
    run_id = await api.create_run()
    history = (await api.call("GET", f"/api/run/{run_id}/history"))[1]["events"]
    assert history[0]["actor"] == "anonymous"

