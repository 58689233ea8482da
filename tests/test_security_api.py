"""The API's door and its inputs, attacked over real HTTP against a real running service (issue 14:
"The door" and "Every input answered"). Each test is one finding, written as the attack, and
checks both the refusal (status and message) and that nothing changed: the stream head, the
registry, the runs, the blob files and the keys of the secrets bucket."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import pytest

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


async def snapshot(api: Api, headers: dict[str, str] | None = None) -> Snapshot:
    service = api.service
    head = await service.store.last_seq()

    async def caught_up() -> bool:
        status, health = await api.call("GET", "/healthz")
        return status == 200 and health["position"] >= head

    await wait_until(caught_up, what="the projection to reach the stream head")
    root = service.settings.resolved_blob_dir
    paths = [p for p in root.rglob("*") if ".tmp" not in p.relative_to(root).parts]
    try:
        kv = await service.store.js.key_value(BUCKET)
        keys = tuple(sorted(await kv.keys()))
    except Exception:  # nats-py raises NoKeysError on an empty bucket
        keys = ()
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


# ---- finding 5: bodies read whole, whatever the transfer encoding ------------------------------


async def test_json_body_in_several_reads_and_chunked_is_read_whole(make_service) -> None:
    api = await make_service(max_json_bytes=64 * 1024)
    kind = json.dumps({"apiVersion": "mlynar.dev/v1alpha1", "kind": "DataKind", "metadata": {"name": "split"},
                       "spec": {"displayName": "x" * 20_000}}).encode()

    async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i:i + size]

    # valid JSON in many chunks (Transfer-Encoding: chunked) is accepted
    status, answer = await api.call("POST", "/api/data-kinds", data=pieces(kind, 1000),
                                    headers={"Content-Type": "application/json"})
    assert status == 201, answer
    # and with a Content-Length, written in several pieces on the socket
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(api))
    other = kind.replace(b'"split"', b'"split2"')
    writer.write(head_of("POST", "/api/data-kinds", "localhost",
                         f"Content-Type: application/json\r\nContent-Length: {len(other)}\r\n"))
    for i in range(0, len(other), 4096):
        writer.write(other[i:i + 4096])
        await writer.drain()
    status, _, body = parse_response(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert status == 201, body
    # a chunked body above the limit is 413, however it is cut, and changes nothing
    before = await snapshot(api)
    big = json.dumps({"kind": "DataKind", "metadata": {"name": "big"}, "spec": {"displayName": "y" * 300_000}}).encode()
    for size in (1000, 64 * 1024, 200_000):
        status, answer = await api.call("POST", "/api/data-kinds", data=pieces(big, size),
                                        headers={"Content-Type": "application/json"})
        assert status == 413 and "larger than 65536 bytes" in answer["error"], (size, status, answer)
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
