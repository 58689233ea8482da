"""The API's door and its inputs, attacked over real HTTP against a real running service (issue 14:
"The door" and "Every input answered"). Each test is one finding, written as the attack, and
checks both the refusal (status and message) and that nothing changed: the stream head, the
registry, the runs, the blob files and the keys of the secrets bucket."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from mlynar_events.secrets import BUCKET
from mlynar_events.serve import ConfigError, Service
from support import Api, service_settings, wait_until

KIND = "number-array-json"
EVIL = "evil.example"
PACE = 0.2
"""Seconds between the bytes a trickling client sends (its pace, not a synchronisation)."""


# ---- what "nothing changed" compares ----------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    head: int
    blobs: tuple[str, ...]
    dirs: tuple[str, ...]
    runs: tuple[str, ...]
    operators: tuple[tuple[str, int], ...]
    machines: tuple[tuple[str, str, bool], ...]
    secrets: tuple[str, ...]


async def secret_keys(service: Service) -> tuple[str, ...]:
    """The live keys of the secrets bucket, read from the stream's own per-subject state (not a
    KV watcher, whose "no more entries" marker can come before the entries under load)."""
    stream, prefix = f"KV_{BUCKET}", f"$KV.{BUCKET}."
    info = await service.store.js.stream_info(stream, subjects_filter=prefix + ">")
    live = []
    for subject in (info.state.subjects or {}):
        last = await service.store.js.get_last_msg(stream, subject)
        if (last.headers or {}).get("KV-Operation") not in {"DEL", "PURGE"}:
            live.append(subject.removeprefix(prefix))
    return tuple(sorted(live))


async def snapshot(api: Api, headers: dict[str, str] | None = None) -> Snapshot:
    service = api.service
    head = await service.store.last_seq()

    async def caught_up() -> bool:
        status, health = await api.call("GET", "/healthz")
        return status == 200 and health["position"] >= head

    await wait_until(caught_up, what="the projection to reach the stream head")
    root = service.settings.resolved_blob_dir
    paths = [p for p in root.rglob("*") if ".tmp" not in p.relative_to(root).parts]
    keys = await secret_keys(service)
    _, runs = await api.call("GET", "/api/runs?limit=1000", headers=headers)
    _, ops = await api.call("GET", "/api/operators", headers=headers)
    _, machines = await api.call("GET", "/api/machines", headers=headers)
    return Snapshot(
        head=head,
        blobs=tuple(sorted(str(p.relative_to(root)) for p in paths if p.is_file())),
        dirs=tuple(sorted(str(p.relative_to(root)) for p in paths if p.is_dir())),
        runs=tuple(sorted(r["id"] for r in runs)),
        operators=tuple(sorted((o["metadata"]["name"], o["revision"]) for o in ops)),
        machines=tuple(sorted((m["name"], m["url"], m["hasToken"]) for m in machines)),
        secrets=keys,
    )


def port_of(api: Api) -> int:
    return int(str(api.service.api_url).rsplit(":", 1)[1])


async def raw(api: Api, head: bytes, body: bytes = b"", read_timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request written as bytes on a fresh connection: (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(api))
    try:
        writer.write(head + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()
    return parse_response(data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    if headers.get("Transfer-Encoding") == "chunked":
        body = _dechunk(body)
    return int(lines[0].split()[1]), headers, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            break
        out, data = out + rest[:size], rest[size + 2:]
    return out


async def read_response(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """One whole response (head and Content-Length body), or what came before the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await asyncio.wait_for(reader.read(4096), timeout)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = await asyncio.wait_for(reader.read(length - len(body)), timeout)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def head_of(method: str, path: str, host: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode()


EVIL_OPERATOR = {"apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator", "metadata": {"name": "sum"},
                 "spec": {"machine": "local", "command": ["sh", "-c", "touch /tmp/mlynar-pwned"],
                          "inputs": [{"fileLocationEnv": "INPUT", "dataKind": KIND}],
                          "possibleOutputKinds": ["number-array-sum-json"]}}


# ---- finding 1: the door ---------------------------------------------------------------------


async def test_cross_site_request_cannot_redefine_an_operator(api: Api) -> None:
    """A page on another site posts a "simple" request (text/plain, its own Origin) that would
    make operator ``sum`` run a shell command on machine ``local``; then it starts a run."""
    run_id = await api.create_run()
    before = await snapshot(api)
    body = json.dumps(EVIL_OPERATOR)
    attempts = [
        ("text/plain from another site", {"Content-Type": "text/plain", "Origin": f"http://{EVIL}"}, "Origin"),
        ("text/plain, no Origin", {"Content-Type": "text/plain"}, "Content-Type application/json"),
        ("form-encoded", {"Content-Type": "application/x-www-form-urlencoded"}, "Content-Type application/json"),
        ("no Content-Type", {"Content-Type": ""}, "Content-Type application/json"),
        ("JSON type, foreign Origin", {"Content-Type": "application/json", "Origin": f"http://{EVIL}"}, "Origin"),
        ("Origin null (sandboxed frame)", {"Content-Type": "application/json", "Origin": "null"}, "Origin"),
        ("another local site", {"Content-Type": "application/json", "Origin": "http://localhost:8081"}, "Origin"),
        ("an Origin with a path", {"Content-Type": "application/json", "Origin": f"http://{EVIL}/x"}, "Origin"),
    ]
    for name, headers, word in attempts:
        status, answer = await api.call("POST", "/api/operators", data=body, headers=headers)
        assert status == 403, f"{name}: {status} {answer}"
        assert word in answer["error"], f"{name}: {answer}"
    status, answer = await api.call("POST", f"/api/run/{run_id}/run", data="{}",
                                    headers={"Content-Type": "text/plain", "Origin": f"http://{EVIL}"})
    assert status == 403 and "Origin" in answer["error"]
    status, answer = await api.call("POST", f"/api/run/{run_id}/run", data="{}", headers={"Content-Type": "text/plain"})
    assert status == 403 and "Content-Type application/json" in answer["error"]
    assert await snapshot(api) == before
    assert dict(before.operators)["sum"] == 1


async def test_same_origin_clients_keep_working(api: Api) -> None:
    """Mlynar's curl examples and a page served from the API's own origin still get in."""
    port = port_of(api)
    status, run = await api.call("POST", "/api/run")  # empty body, no Content-Type (curl -X POST)
    assert status == 201, run
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        status, _ = await api.call("GET", "/api/runs", headers={"Host": host})
        assert status == 200, host
    status, answer = await api.call("POST", f"/api/run/{run['id']}/run", json={"sum": []},
                                    headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200, answer
    status, answer = await api.call("POST", "/api/data-kinds", data=json.dumps(
        {"kind": "DataKind", "metadata": {"name": "csv"}}), headers={"Content-Type": "application/vnd.mlynar+json"})
    assert status == 201, answer


async def test_dns_rebinding_host_is_refused_for_reads_and_writes(make_service) -> None:
    """A rebinding page talks to 127.0.0.1 under its own name: its Host is refused, reads too;
    the names the operator configures (--public-url, --allowed-host) are let in."""
    api = await make_service(public_url="https://mlynar.example.org", allowed_host=["ingress.internal"])
    run_id = await api.create_run()
    before = await snapshot(api)
    port = port_of(api)
    for method, path in (("GET", "/api/runs"), ("GET", f"/api/run/{run_id}"), ("POST", "/api/run"),
                         ("DELETE", f"/api/run/{run_id}"), ("GET", "/api/machines")):
        for host in (f"{EVIL}:{port}", EVIL, f"localhost.{EVIL}", f"127.0.0.1.{EVIL}", "localhost@evil.example",
                     f"{EVIL}:{port}:1"):
            status, answer = await api.call(method, path, headers={"Host": host})
            assert status == 403, f"{method} {path} Host {host}: {status} {answer}"
            assert "not a name this service answers for" in answer["error"] or "Host" in answer["error"]
    status, _, body = await raw(api, b"GET /api/runs HTTP/1.0\r\n\r\n")  # no Host at all
    assert status == 403 and b"Host" in body
    assert await snapshot(api) == before
    for host in ("mlynar.example.org", "ingress.internal:8443", f"localhost:{port}"):
        status, answer = await api.call("GET", f"/api/run/{run_id}", headers={"Host": host})
        assert status == 200, f"{host}: {answer}"
    status, answer = await api.call("POST", "/api/run", headers={"Host": "mlynar.example.org",
                                                                  "Origin": "https://mlynar.example.org"})
    assert status == 201, answer
    status, answer = await api.call("POST", "/api/run", headers={"Host": "mlynar.example.org",
                                                                  "Origin": "https://www.example.org"})
    assert status == 403 and "Origin" in answer["error"], answer


async def test_host_header_is_not_reflected_into_unit_urls(api: Api) -> None:
    """Without --public-url, unit URLs use the request's Host: only a Host the door let in."""
    run_id = await api.create_run()
    status, unit = await api.upload(run_id, KIND, b"[1]")
    assert status == 201
    before = await snapshot(api)
    status, answer = await api.call("GET", f"/api/run/{run_id}", headers={"Host": f"{EVIL}:80"})
    assert status == 403 and "dataPool" not in answer and "not a name this service answers for" in answer["error"]
    status, answer = await api.call("GET", f"/api/run/{run_id}", headers={"Host": "localhost:4242"})
    assert status == 200 and answer["dataPool"][0]["url"].startswith("http://localhost:4242/static/")
    assert await snapshot(api) == before


async def test_auth_is_decided_by_the_route_not_the_path_text(make_service, tmp_path: Path) -> None:
    """With a token, a path that only *contains* ``/returns/`` (decoded from %2F) used to skip
    auth; now only the step-credential routes themselves do, and they still check a credential."""
    token_file = tmp_path / "token"
    token_file.write_text("a-long-enough-api-token\n")
    api = await make_service(api_token_file=token_file)
    auth = {"Authorization": "Bearer a-long-enough-api-token"}
    status, run = await api.call("POST", "/api/run", headers=auth)
    assert status == 201
    step_route = f"/api/run/{run['id']}/returns/s1/inputs/0?attempt=1"
    status, answer = await api.call("GET", step_route, headers={"Authorization": "Bearer forged"})
    assert status == 403  # (the first step credential checked creates the server's key)
    before = await snapshot(api, auth)
    for method, path in (("GET", f"/api/run/{run['id']}/steps/x%2Freturns%2Fy/logs"),
                         ("GET", f"/api/run/{run['id']}/steps/%2Freturns%2F"),
                         ("POST", f"/api/run/{run['id']}/terminate?x=/returns/"),
                         ("DELETE", f"/api/run/{run['id']}?/returns/=1")):
        status, answer = await api.call(method, path)
        assert status == 401 and answer["error"] == "missing bearer token", f"{method} {path}: {status} {answer}"
    # the step routes are still reachable without the API token, and refuse without their own
    status, answer = await api.call("GET", f"/api/run/{run['id']}/returns/s1/inputs/0?attempt=1")
    assert status == 401 and "credential of the step" in answer["error"]
    status, answer = await api.call("GET", f"/api/run/{run['id']}/returns/s1/inputs/0?attempt=1",
                                    headers={"Authorization": "Bearer forged"})
    assert status == 403
    # a step Job reaches the API by its in-cluster Service name, a probe by the pod's IP: those
    # routes answer whatever the Host (the step's credential or nothing to protect stands in)
    status, answer = await api.call("GET", step_route, headers={"Host": "mlynar-api:3000",
                                                                "Authorization": "Bearer forged"})
    assert status == 403 and "credential is not valid" in answer["error"], answer
    status, answer = await api.call("GET", "/healthz", headers={"Host": "10.1.2.3:3000"})
    assert status == 200, answer
    assert await snapshot(api, auth) == before


# ---- finding 3: tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n  \n", "short-token"])
async def test_an_empty_or_short_token_file_is_refused_at_start(tmp_path: Path, nats_url: str, content: str) -> None:
    """An empty token file used to start a public server where any bearer header passed."""
    token_file = tmp_path / "token"
    token_file.write_text(content)
    service = Service(service_settings(tmp_path, nats_url, host="0.0.0.0", api_token_file=token_file))
    with pytest.raises(ConfigError, match="token"):
        await service.start()
    assert service.api_url is None and service.store is None  # nothing was started


async def test_anonymous_only_on_loopback(tmp_path: Path, nats_url: str, make_service) -> None:
    """Without a token the API refuses to listen beyond loopback; with one, no header and an
    empty bearer are refused."""
    with pytest.raises(ConfigError, match="without --api-token-file"):
        await Service(service_settings(tmp_path, nats_url, host="0.0.0.0")).start()
    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123\n")
    api = await make_service(api_token_file=token_file)
    before_head = await api.service.store.last_seq()
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}, {"Authorization": "Basic x"},
                    {"Authorization": "Bearer 0123456789abcdef012"}):
        status, answer = await api.call("POST", "/api/run", headers=headers)
        assert status in (401, 403) and answer["error"], headers
    assert await api.service.store.last_seq() == before_head


# ---- finding 4: machines (SSRF) ---------------------------------------------------------------


@pytest.fixture
async def target() -> AsyncIterator["Target"]:
    """A server standing in for an internal service (or an attacker's host): it records what it
    was sent and answers with a body that must never come back through the API."""
    t = Target()
    runner = web.AppRunner(t.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    t.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield t
    finally:
        await runner.cleanup()


class Target:
    SECRET_BODY = "internal-metadata-secret-4711"

    def __init__(self) -> None:
        self.url = ""
        self.seen: list[tuple[str, str | None]] = []

    def app(self) -> web.Application:
        async def anything(request: web.Request) -> web.Response:
            self.seen.append((request.path_qs, request.headers.get("Authorization")))
            return web.json_response({"status": "ok", "secret": self.SECRET_BODY})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app


async def test_machine_urls_cannot_aim_the_check_elsewhere_or_echo_it(api: Api, target: Target) -> None:
    """A URL ending in ``#`` or ``?x=`` swallowed ``/v1/healthz``, and ``/check`` echoed the
    target's body: both refused, and the check reports only status, latency and a fixed message."""
    before = await snapshot(api)
    for url in (f"{target.url}/latest/meta-data#", f"{target.url}/x?y=", f"{target.url}?", "http://u:p@127.0.0.1:1",
                f"{target.url}/a b", "gopher://127.0.0.1:70", f"{target.url}\\@evil", f"{target.url}/\n"):
        status, answer = await api.call("POST", "/api/machines", json={"name": "probe", "url": url, "token": "t" * 20})
        assert status == 400, f"{url!r}: {status} {answer}"
        assert "http(s)://host[:port][/path]" in json.dumps(answer), answer
    assert await snapshot(api) == before and target.seen == []
    status, machine = await api.call("POST", "/api/machines", json={"name": "probe", "url": target.url + "/agent"})
    assert status == 201, machine
    status, check = await api.call("POST", "/api/machines/probe/check")
    assert status == 200 and check["ok"] is True and check["status"] == 200, check
    assert Target.SECRET_BODY not in json.dumps(check) and isinstance(check["latencyMs"], float)
    assert target.seen == [("/agent/v1/healthz", None)]


async def test_a_new_machine_url_never_gets_the_stored_token(api: Api, target: Target) -> None:
    """``PUT`` with only a new ``url`` kept the stored token and sent it to the new host (the
    ``local`` agent's token was captured that way)."""
    before = await snapshot(api)
    status, answer = await api.call("PUT", "/api/machines/local", json={"url": target.url})
    assert status == 400 and "needs its token again" in answer["error"], answer
    status, answer = await api.call("PUT", "/api/machines/local", json={"url": target.url, "labels": {"a": "b"}})
    assert status == 400
    status, check = await api.call("POST", "/api/machines/local/check")
    assert status == 200 and check["ok"] is True  # still the real agent, with its token
    assert await snapshot(api) == before and target.seen == []
    # giving the URL with "token": null drops the stored token; the new host gets none
    status, machine = await api.call("PUT", "/api/machines/local", json={"url": target.url, "token": None})
    assert status == 200 and machine["hasToken"] is False and machine["url"] == target.url, machine
    assert "machine.local" not in (await snapshot(api)).secrets
    await api.call("POST", "/api/machines/local/check")
    assert target.seen == [("/v1/healthz", None)]
    # and a token given with the new URL is the one that goes there
    status, machine = await api.call("PUT", "/api/machines/local", json={"url": target.url, "token": "new-token-0123"})
    assert status == 200 and machine["hasToken"] is True
    await api.call("POST", "/api/machines/local/check")
    assert target.seen[-1] == ("/v1/healthz", "Bearer new-token-0123")


# ---- finding 5: bodies read whole, whatever the transfer encoding ------------------------------


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def started_request(api: Api, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose head is sent with ``Expect: 100-continue``, once its handler is running
    (the 100 Continue says so) and about to read the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(api))
    writer.write(head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
    assert (await read_response(reader)).startswith(b"HTTP/1.1 100 Continue")
    return reader, writer


async def not_answered_yet(reader: asyncio.StreamReader) -> bool:
    """The server has not answered within a moment (it is still waiting for the body)."""
    try:
        await asyncio.wait_for(reader.read(1), PACE)
    except asyncio.TimeoutError:
        return True
    return False


async def test_json_body_in_several_reads_and_chunked_is_read_whole(make_service) -> None:
    """``json_body`` read only what had arrived at its first read: a valid body arriving in two
    reads was "malformed JSON", and a chunked body whose first chunk was a whole document got in
    whatever followed it (20 MiB with a 1 MiB limit was 201)."""
    api = await make_service(max_json_bytes=64 * 1024)
    kind = json.dumps({"apiVersion": "mlynar.dev/v1alpha1", "kind": "DataKind", "metadata": {"name": "split"},
                       "spec": {"displayName": "x" * 20_000}}).encode()
    # with a Content-Length, the second half arriving after the handler's first read
    reader, writer = await started_request(api, head_of("POST", "/api/data-kinds", "localhost",
                                                        f"Content-Type: application/json\r\nContent-Length: {len(kind)}\r\n"))
    writer.write(kind[:1000])
    await writer.drain()
    assert await not_answered_yet(reader), "answered before the body was complete"
    writer.write(kind[1000:])
    status, _, body = parse_response(await read_response(reader))
    writer.close()
    assert status == 201, body
    # chunked, in many chunks (aiohttp's client streaming a generator)
    async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i:i + size]

    status, answer = await api.call("POST", "/api/data-kinds", data=pieces(kind.replace(b'"split"', b'"split2"'), 1000),
                                    headers={"Content-Type": "application/json"})
    assert status == 201, answer
    # chunked beyond the limit: a whole document first, then 300 kB more, is 413 and changes nothing
    before = await snapshot(api)
    doc = json.dumps({"kind": "DataKind", "metadata": {"name": "big"}}).encode()
    reader, writer = await started_request(api, head_of("POST", "/api/data-kinds", "localhost",
                                                        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"))
    writer.write(chunk(doc))
    await writer.drain()
    assert await not_answered_yet(reader), "answered before the body was complete"
    for _ in range(30):
        writer.write(chunk(b" " * 10_000))
    writer.write(b"0\r\n\r\n")
    status, _, body = parse_response(await read_response(reader))
    writer.close()
    assert status == 413 and b"larger than 65536 bytes" in body, body
    assert await snapshot(api) == before


# ---- finding 8: timeouts and a connection cap -------------------------------------------------


async def trickle(api: Api, prefix: bytes, data: bytes, limit: float) -> tuple[float, bytes]:
    """Send ``prefix`` at once, then ``data`` one byte per PACE seconds until the server answers
    or closes; return how long that took and what it sent. Fails if it still holds on after
    ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(api))
    started = loop.time()
    try:
        writer.write(prefix)
        for byte in data:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            try:
                first = await asyncio.wait_for(reader.read(1), PACE)  # the server's reaction, or the pace
            except asyncio.TimeoutError:
                assert loop.time() - started < limit, f"still connected after {limit}s"
                continue
            took = loop.time() - started
            return took, (first + await read_response(reader)) if first else b""
        return loop.time() - started, await read_response(reader, limit)
    finally:
        writer.close()


@pytest.fixture
async def strict_api(make_service) -> Api:
    return await make_service(header_timeout=1.5, body_timeout=1.0, body_min_rate=1000)


async def test_a_trickled_request_head_is_cut_off(strict_api: Api) -> None:
    api = strict_api
    before = await snapshot(api)
    head = head_of("POST", "/api/run", "localhost", "X-Padding: " + "a" * 200 + "\r\n")
    took, answer = await trickle(api, b"", head, limit=6)
    assert answer == b"" and 1.4 < took < 6, (took, answer)  # closed unanswered after --header-timeout
    assert await snapshot(api) == before


async def test_a_trickled_body_is_answered_408(strict_api: Api) -> None:
    api = strict_api
    run_id = await api.create_run()
    before = await snapshot(api)
    body = json.dumps({"kind": "DataKind", "metadata": {"name": "slow"}}).encode()
    head = head_of("POST", "/api/data-kinds", "localhost",
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    took, answer = await trickle(api, head, body, limit=8)
    status, _, text = parse_response(answer)
    assert status == 408 and b"arrived too slowly" in text and took < 8, (took, answer)
    # an upload trickled the same way
    form = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.json"\r\n\r\n' + b"1," * 100 + b"\r\n--b--\r\n"
    head = head_of("POST", f"/api/run/{run_id}/upload/{KIND}", "localhost",
                   f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(form)}\r\n")
    took, answer = await trickle(api, head + form[:80], form[80:], limit=8)
    status, _, text = parse_response(answer)
    assert status == 408 and b"arrived too slowly" in text, answer
    assert await snapshot(api) == before
    assert not any((api.service.settings.resolved_blob_dir / ".tmp").iterdir())


async def test_connections_beyond_the_cap_are_refused_and_freed_again(make_service) -> None:
    api = await make_service(max_connections=4)
    before = await snapshot(api)
    idle = [await asyncio.open_connection("127.0.0.1", port_of(api)) for _ in range(4)]
    try:
        async def refused() -> bytes | None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(api))
            try:  # answered before it asks anything
                data = await asyncio.wait_for(read_response(reader), 10)
            except asyncio.TimeoutError:
                data = b""
            finally:
                writer.close()
            return data if data.startswith(b"HTTP/1.1 503") else None

        answer = await wait_until(refused, timeout=10, what="a connection beyond the cap to be refused")
        assert b"too many open connections" in answer
    finally:
        for _, writer in idle:
            writer.close()

    async def served() -> bool:
        try:
            status, _, _ = await raw(api, head_of("GET", "/api/runs", "localhost"))
        except ConnectionResetError:  # refused while the closed ones are still being counted
            return False
        return status == 200

    await wait_until(served, timeout=10, what="the freed connections to be usable again")
    assert await snapshot(api) == before


# ---- Low: every input answered ----------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_deeply_nested_json_is_400_everywhere(api: Api) -> None:
    run_id = await api.create_run()
    before = await snapshot(api)
    deep_array = nested(100_000)
    deep_object = '{"a":' * 2000 + "1" + "}" * 2000
    for method, path in (("POST", "/api/data-kinds"), ("POST", "/api/operators"), ("POST", "/api/machines"),
                         ("PUT", "/api/machines/local"), ("POST", f"/api/run/{run_id}/run")):
        for text in (deep_array, deep_object, '{"metadata": {"name": "x"}, "spec": %s}' % nested(70)):
            status, answer = await api.call(method, path, data=text, headers={"Content-Type": "application/json"})
            assert status == 400 and "nested deeper than" in answer["error"], f"{method} {path}: {status} {answer}"
    assert await snapshot(api) == before


async def test_unencodable_text_is_400_before_anything_is_written(api: Api) -> None:
    """A lone surrogate parsed fine and failed at append (500), after ``register_machine`` had
    already stored the machine's token: an orphan secret."""
    run_id = await api.create_run()
    before = await snapshot(api)
    cases = [
        ("POST", "/api/machines", '{"name": "m1", "url": "http://127.0.0.1:9", "token": "tok-tok-tok",'
                                  ' "labels": {"a": "\\ud800"}}'),
        ("POST", "/api/machines", '{"name": "m2", "url": "http://127.0.0.1:9", "token": "tok\\udfff"}'),
        ("PUT", "/api/machines/local", '{"labels": {"\\udc80": "x"}}'),
        ("POST", "/api/data-kinds", '{"metadata": {"name": "k"}, "spec": {"displayName": "\\ud800"}}'),
        ("POST", "/api/operators", '{"metadata": {"name": "o"}, "spec": {"image": "\\ud83d"}}'),
        ("POST", f"/api/run/{run_id}/run", '{"sum": [{"name": "MULTIPLY_BY", "value": "\\ud800"}]}'),
    ]
    for method, path, text in cases:
        status, answer = await api.call(method, path, data=text, headers={"Content-Type": "application/json"})
        assert status == 400 and "not valid Unicode" in answer["error"], f"{method} {path}: {status} {answer}"
    for text in (b'{"metadata": {"name": "k"}, "spec": {"displayName": "\xff"}}', b'[NaN]', b"1" * 5000):
        status, answer = await api.call("POST", "/api/data-kinds", data=text, headers={"Content-Type": "application/json"})
        assert status == 400 and answer["error"] == "malformed JSON", (text[:20], answer)
    after = await snapshot(api)
    assert after == before and not any(k.startswith("machine.m") for k in after.secrets)


async def test_integer_parameters_are_bounded(api: Api) -> None:
    run_id = await api.create_run()
    before = await snapshot(api)
    for path in ("/api/runs?offset=9223372036854775808", "/api/runs?offset=-1", "/api/runs?limit=0",
                 "/api/runs?limit=99999999999999999999999", "/api/runs?limit=1e3", "/api/runs?offset=%201",
                 f"/api/run/{run_id}/steps/x/logs?attempt=99999999999999999999"):
        status, answer = await api.call("GET", path)
        assert status == 400 and ("must be" in answer["error"]), f"{path}: {status} {answer}"
    for query in ("maxParallel=9223372036854775808", "maxParallel=0", "maxParallel=%E2%91%A0"):
        status, answer = await api.call("POST", f"/api/run/{run_id}/run?{query}")
        assert status == 400 and "maxParallel must be" in answer["error"], (query, answer)
    assert await snapshot(api) == before
    assert (await api.call("GET", "/api/runs?offset=2147483648&limit=1000"))[1] == []


async def test_multipart_without_its_closing_boundary_stores_nothing(api: Api) -> None:
    run_id = await api.create_run()
    before = await snapshot(api)
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.json"\r\n\r\n[1,2,3]'
    for body in (part, part + b"\r\n", part + b"\r\n--b", part + b"\r\n--b\r\n", part + b"\r\n--bx--\r\n"):
        head = head_of("POST", f"/api/run/{run_id}/upload/{KIND}", "localhost",
                       f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n")
        status, _, text = await raw(api, head, body)
        assert status == 400 and b"malformed multipart body" in text, (body[-12:], status, text)
    assert await snapshot(api) == before
    assert (await api.run(run_id))["dataPool"] == []
    status, _, text = await raw(api, head_of("POST", f"/api/run/{run_id}/upload/{KIND}", "localhost",
                                             "Content-Type: multipart/form-data; boundary=b\r\n"
                                             f"Content-Length: {len(part) + 9}\r\n"), part + b"\r\n--b--\r\n")
    assert status == 201, text  # the same body with its closing boundary is a unit


async def test_client_disconnects_are_not_errors(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    """A client that goes away mid-body was logged as a 500 with a traceback."""
    run_id = await api.create_run()
    before = await snapshot(api)
    caplog.set_level(logging.INFO)
    uploads = f"/api/run/{run_id}/upload/{KIND}"
    for path, ctype, body in ((uploads, "multipart/form-data; boundary=b",
                               b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n[1,'),
                              ("/api/data-kinds", "application/json", b'{"metadata": {"na')):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(api))
        writer.write(head_of("POST", path, "localhost", f"Content-Type: {ctype}\r\nContent-Length: 100000\r\n"
                                                         "Expect: 100-continue\r\n"))
        # the 100 Continue says the request reached its handler, which then reads the body
        assert (await read_response(reader)).startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        await writer.drain()
        writer.close()
        await wait_until(lambda: _disconnect_logged(caplog, path), what=f"the disconnect from {path} to be noticed")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert await snapshot(api) == before
    assert not any((api.service.settings.resolved_blob_dir / ".tmp").iterdir())


async def _disconnect_logged(caplog: pytest.LogCaptureFixture, path: str) -> bool:
    return any(r.getMessage() == "client disconnected" and getattr(r, "path", None) == path for r in caplog.records)


async def test_delete_racing_uploads_leaves_no_empty_directories(api: Api) -> None:
    root = api.service.settings.resolved_blob_dir
    for _ in range(3):
        run_id = await api.create_run()
        release = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b"[1,"
            await release.wait()
            yield b"2]"

        async def held_upload() -> tuple[int, Any]:
            form = aiohttp.FormData()
            form.add_field("file", body(), filename="x.json", content_type="application/octet-stream")
            return await api.call("POST", f"/api/run/{run_id}/upload/{KIND}", data=form)

        uploads = [asyncio.ensure_future(held_upload()) for _ in range(3)]
        await wait_until(lambda: _tmp_files(root, 3), what="the uploads to be streaming")
        status, answer = await api.call("DELETE", f"/api/run/{run_id}")
        assert status == 200, answer
        release.set()
        results = await asyncio.gather(*uploads)
        assert all(status in (404, 409) for status, _ in results), results
        assert not (root / "runs" / run_id).exists(), sorted(str(p) for p in (root / "runs").rglob("*"))
        status, answer = await api.call("GET", f"/api/run/{run_id}")
        assert status == 404


async def _tmp_files(root: Path, n: int) -> bool:
    return len(list((root / ".tmp").iterdir())) >= n
