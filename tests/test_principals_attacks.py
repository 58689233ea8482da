"""Principals and roles attacked as a member or a viewer would, with real requests against a
service that requires tokens (``--api-token-file``): each test is one attack, checked to be
refused and to have changed nothing. The people and their service are ``tests/test_principals.py``'s."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import test_principals
from test_principals import KIND, People, started_run

from mlynar_events import runs as commands
from mlynar_events.secrets import SecretStore, machine_token_key, secret_ref

people = test_principals.people  # the fixture: a service requiring tokens, a client per principal

SSE = {"Accept": "text/event-stream"}


async def sse_until(resp: aiohttp.ClientResponse, done: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The CloudEvents read off an open SSE response until ``done(seen)`` (or the stream ends)."""
    seen: list[dict[str, Any]] = []

    async def read() -> None:
        while not done(seen):
            line = (await resp.content.readline()).decode()
            if not line:
                return
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))

    await asyncio.wait_for(read(), timeout)
    return seen


def created(run_id: str) -> Any:
    return lambda seen: any(e.get("subject") == run_id and e["type"].endswith("RunCreated") for e in seen)


async def test_a_deleted_run_of_another_member_stays_hidden(people: People) -> None:
    """The views forget a deleted run, but its events stay in the stream: another member must not
    read them through the history, the run's event stream, ``?at=`` or the lineage."""
    alice, bob, vera = (await people.person("alice", "member"), await people.person("bob", "member"),
                        await people.person("vera", "viewer"))
    run_id = await started_run(alice)
    await alice.wait_status(run_id, "complete")
    at = (await alice.call("GET", f"/api/run/{run_id}/history"))[1]["events"][-1]["sequence"]
    assert (await alice.call("DELETE", f"/api/run/{run_id}"))[0] == 200
    head = await people.admin.service.store.last_seq()
    for path, headers in [(f"/api/run/{run_id}/history", None), (f"/api/run/{run_id}/events", None),
                          (f"/api/run/{run_id}/events?after=0", SSE), (f"/api/run/{run_id}?at={at}", None),
                          (f"/api/run/{run_id}/lineage", None), (f"/api/run/{run_id}/params", None)]:
        status, body = await bob.call("GET", path, headers=headers)
        assert status == 404, (path, status, body)
        assert "alice" not in json.dumps(body) and "MULTIPLY_BY" not in json.dumps(body), (path, body)
    # its owner, a viewer and an admin still have the audit trail
    for who in (alice, vera, people.admin):
        status, body = await who.call("GET", f"/api/run/{run_id}/history")
        assert status == 200 and body["events"][0]["data"]["owner"] == "alice"
    assert await people.admin.service.store.last_seq() == head


async def test_another_members_run_is_hidden_on_every_replay_of_the_event_stream(people: People) -> None:
    """``?run=`` naming another member's run, ``Last-Event-ID`` and ``?after=`` replays (also with a
    ``type`` filter) show nothing of it; the run's own stream is a 404."""
    alice, bob = await people.person("alice", "member"), await people.person("bob", "member")
    theirs = await started_run(alice)
    await alice.wait_status(theirs, "complete")
    assert (await bob.call("GET", f"/api/run/{theirs}/events", headers=SSE))[0] == 404
    own = await bob.create_run()
    for query, headers in [(f"run={theirs}&run={own}&after=0", SSE),
                           (f"run={theirs}&run={own}", {**SSE, "Last-Event-ID": "0"}),
                           (f"run={theirs}&run={own}&type=RunCreated&type=DataUnitAdded&after=0", SSE),
                           ("after=0", {**SSE, "Last-Event-ID": "1"})]:
        async with bob.http.get(f"/api/events?{query}", headers=headers) as resp:
            assert resp.status == 200
            seen = await sse_until(resp, created(own))
        assert created(own)(seen), (query, seen)
        assert all(e.get("subject") != theirs for e in seen), (query, seen)
        assert "alice" not in json.dumps(seen)


async def test_a_run_is_hidden_from_another_member_before_the_views_show_it(people: People) -> None:
    """A run appended a moment ago (the views may not have it yet, as on a lagging replica) is
    another member's 404 from the first instant, through the stream's fold."""
    bob = await people.person("bob", "member")
    await people.person("alice", "member")
    store = people.admin.service.store
    for _ in range(5):
        run_id, _seq = await commands.create(store, "alice")
        head = await store.last_seq()
        for path in (f"/api/run/{run_id}", f"/api/run/{run_id}/history", f"/api/run/{run_id}/lineage"):
            status, body = await bob.call("GET", path)
            assert status == 404, (path, status, body)
        assert (await bob.upload(run_id, KIND, b"[1]"))[0] == 404
        assert (await bob.call("POST", f"/api/run/{run_id}/run"))[0] == 404
        assert await store.last_seq() == head


async def test_a_revoked_token_is_cut_from_its_open_event_stream(people: People) -> None:
    """A stream opened before its token was revoked sends nothing appended after the revocation's
    answer, and ends."""
    alice = await people.person("alice", "member")
    run_id = await alice.create_run()
    token_id = (await people.admin.call("GET", "/api/tokens"))[1][0]["id"]
    async with alice.http.get(f"/api/events?run={run_id}&after=0", headers=SSE) as resp:
        assert resp.status == 200
        assert created(run_id)(await sse_until(resp, created(run_id)))
        assert (await people.admin.call("DELETE", f"/api/tokens/{token_id}"))[0] == 200
        # the admin adds to alice's run: none of it may reach the revoked token
        assert (await people.admin.upload(run_id, KIND, b"[1,2]"))[0] == 201
        after = await sse_until(resp, lambda seen: False, 10)  # to the end of the stream
    assert after == []
    assert (await alice.call("GET", "/api/runs"))[0] == 403


async def test_an_idle_event_stream_of_a_revoked_token_ends_at_its_next_heartbeat(make_service: Any,
                                                                                   tmp_path: Any) -> None:
    """No event needs to come: the stream of a revoked token ends at the next keep-alive, so a
    revoked client holding the connection open learns it is out (and reconnecting is a 403)."""
    async with test_principals.people_of(make_service, tmp_path, sse_heartbeat=0.2) as folks:
        alice = await folks.person("alice", "member")
        token_id = (await folks.admin.call("GET", "/api/tokens"))[1][0]["id"]
        head = await folks.admin.service.store.last_seq()
        async with alice.http.get(f"/api/events?after={head}", headers=SSE) as resp:  # nothing to send
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"retry:")
            assert (await folks.admin.call("DELETE", f"/api/tokens/{token_id}"))[0] == 200
            rest = await asyncio.wait_for(resp.content.read(), 10)  # to the end of the stream
        assert b"data:" not in rest
        assert (await alice.call("GET", "/api/events", headers=SSE))[0] == 403


async def test_a_revoked_admin_token_is_cut_from_its_open_event_stream(people: People) -> None:
    """Also an admin's created token: an admin sees every event, but not after its revocation."""
    root = await people.person("root", "admin")
    token_id = (await people.admin.call("GET", "/api/tokens"))[1][0]["id"]
    async with root.http.get("/api/events", headers=SSE) as resp:
        assert resp.status == 200
        assert (await people.admin.call("DELETE", f"/api/tokens/{token_id}"))[0] == 200
        run_id = await people.admin.create_run()
        after = await sse_until(resp, lambda seen: False, 10)
    assert all(e.get("subject") != run_id for e in after), after


async def test_authorization_header_tricks_are_refused(people: People) -> None:
    """Near misses of a member's token, other schemes and a token's id or digest: refused, nothing
    written. The scheme's case and surrounding blanks do not matter (RFC 9110)."""
    await people.person("bob", "member")
    token = people.tokens["bob"]
    token_id = (await people.admin.call("GET", "/api/tokens"))[1][0]["id"]
    from mlynar_events.principals import token_digest

    nobody = people.as_token(None)
    head = await people.admin.service.store.last_seq()
    for header in [f"Basic {token}", f"Bearer{token}", f"Bearer {token}x", f"Bearer {token[:-1]}",
                   f"Bearer {token.upper()}", f"Bearer {token_digest(token)}", f"Bearer {token_id}",
                   "Bearer", "Bearer ", "Bearer mlt_", f"Bearer {token} {token}", f"Token {token}",
                   f"Bearer {token},Bearer {token}", "Bearer " + "x" * 4000]:
        status, body = await nobody.call("POST", "/api/run", headers={"Authorization": header})
        assert status in {401, 403}, (header, status, body)
    assert await people.admin.service.store.last_seq() == head
    for header in [f"bearer {token}", f"BEARER   {token}  "]:
        status, body = await nobody.call("GET", "/api/runs", headers={"Authorization": header})
        assert status == 200, (header, body)


async def test_a_member_cannot_take_over_a_machine_name(people: People) -> None:
    """``local``, another member's machine, a deleted one's name (a name is never reused, so an
    operator's ``spec.machine`` cannot be captured by whoever registers it next) and a changed
    case: refused, and the machines (and their tokens) are as they were."""
    alice, bob = await people.person("alice", "member"), await people.person("bob", "member")
    new = {"url": "http://127.0.0.1:9", "token": "bobs-agent-token", "sharedWith": ["*"]}
    mine = {"url": "http://127.0.0.1:9", "token": "alices-agent-token"}
    assert (await alice.call("POST", "/api/machines", json={**mine, "name": "alice-laptop"}))[0] == 201
    assert (await alice.call("POST", "/api/machines", json={**mine, "name": "alice-old"}))[0] == 201
    assert (await alice.call("DELETE", "/api/machines/alice-old"))[0] == 200
    before = (await people.admin.call("GET", "/api/machines"))[1]
    head = await people.admin.service.store.last_seq()
    for name, expected in [("local", 409), ("alice-laptop", 409), ("alice-old", 409), ("Alice-Laptop", 400),
                           ("local.", 400), ("alice-laptop\n", 400)]:
        status, body = await bob.call("POST", "/api/machines", json={**new, "name": name})
        assert status == expected, (name, status, body)
    for method, path, body in [("PUT", "/api/machines/alice-old", {"sharedWith": ["bob"]}),
                               ("PUT", "/api/machines/Alice-Laptop", {"sharedWith": ["bob"]}),
                               ("PUT", "/api/machines/alice-laptop%20", {"sharedWith": ["bob"]}),
                               ("PUT", "/api/machines/local", {"url": "http://127.0.0.1:9", "token": "t"})]:
        status, answer = await bob.call(method, path, json=body)
        assert status in {403, 404}, (method, path, status, answer)
    assert await people.admin.service.store.last_seq() == head
    assert (await people.admin.call("GET", "/api/machines"))[1] == before
    secrets = await SecretStore.open(people.admin.service.store.js)
    assert await secrets.get(secret_ref(machine_token_key("alice-laptop"))) == "alices-agent-token"
    assert await secrets.get(secret_ref(machine_token_key("alice-old"))) is None


async def test_token_requests_out_of_bounds_are_4xx_and_write_nothing(people: People) -> None:
    """Tokens are the admin's: a member is refused; the admin's huge, deep, malformed or
    over-specified bodies, service names as principals and odd token ids are 4xx, never a 5xx,
    and nothing is written."""
    bob = await people.person("bob", "member")
    head = await people.admin.service.store.last_seq()
    listed = (await people.admin.call("GET", "/api/tokens"))[1]
    assert (await bob.call("POST", "/api/tokens", json={"principal": "bob", "role": "admin"}))[0] == 403
    token_id = listed[0]["id"]
    assert (await bob.call("DELETE", f"/api/tokens/{token_id}"))[0] == 403
    raw = {"headers": {"Content-Type": "application/json"}}
    for data in [b'{"principal": "eve", "role": "member", "description": "' + b"x" * (2 * 1024**2) + b'"}',
                 b"[" * 100_000 + b"]" * 100_000, b'{"principal": "eve", "role": "member"', b"\xff\xfe",
                 b'{"principal": "eve", "role": "member", "description": "' + b"x" * 1001 + b'"}',
                 b'{"principal": "' + b"e" * 64 + b'", "role": "member"}',
                 b'{"principal": "eve", "role": "member", "digest": "00"}',
                 b'{"principal": "eve", "role": "member", "createdBy": "admin"}',
                 b'{"principal": "eve\\u0000", "role": "member"}', b'{"principal": 1, "role": "member"}',
                 b'{"principal": "eve", "role": "Admin"}', b'{"principal": "eve", "role": "member"}' * 2]:
        status, body = await people.admin.call("POST", "/api/tokens", data=data, **raw)
        assert 400 <= status < 500, (data[:80], status, body)
    # names the service acts as: a principal named so would own their machines (``local`` is
    # ``serve``'s) and be indistinguishable from them in every history
    for name in ("serve", "solver", "api", "system", "registry-file", "crd-sync", "executor"):
        status, body = await people.admin.call("POST", "/api/tokens", json={"principal": name, "role": "member"})
        assert status == 400 and "reserved" in body["error"], (name, status, body)
    for path in [f"/api/tokens/{token_id}%0A", f"/api/tokens/{token_id.upper()}", "/api/tokens/..%2Ftokens",
                 "/api/tokens/%2e%2e", f"/api/tokens/{token_id}/", "/api/tokens/tok-" + "0" * 5000]:
        status, body = await people.admin.call("DELETE", path)
        assert status in {404, 405, 414, 400}, (path, status, body)
    assert await people.admin.service.store.last_seq() == head
    assert (await people.admin.call("GET", "/api/tokens"))[1] == listed
    assert (await bob.call("GET", "/api/runs"))[0] == 200  # bob's token was never revoked


async def test_a_members_listing_pages_only_through_its_own_runs(people: People) -> None:
    alice, bob = await people.person("alice", "member"), await people.person("bob", "member")
    theirs = {await alice.create_run() for _ in range(3)}
    own = {await bob.create_run() for _ in range(2)}
    pages: list[str] = []
    for offset in range(6):
        status, body = await bob.call("GET", f"/api/runs?limit=1&offset={offset}")
        assert status == 200
        pages += [r["id"] for r in body]
    assert set(pages) == own and len(pages) == 2 and not set(pages) & theirs
    for query in ["owner=alice", "limit=1000&owner=", "offset=-1", "limit=0"]:
        status, body = await bob.call("GET", f"/api/runs?{query}")
        assert status == 400 or {r["id"] for r in body} <= own, (query, body)
