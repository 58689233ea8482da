"""Webhooks, against real parts: the service (API, projector, dispatcher) on a real nats-server,
and a real aiohttp receiver on 127.0.0.1 that checks what it gets the way a user's would, with
the ``standardwebhooks`` and ``cloudevents`` libraries.

Each guarantee is attacked: the receiver is down (503, then connection refused) across a
service restart; it fails until the webhook is marked failing; the secret is rotated; private
targets are sent to a non-loopback API and to a dispatcher that is not loopback-only; the
stream, the delivery records and the answers are searched for the secret."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cloudevents.core.formats.json import JSONFormat
from nats.js.errors import KeyNotFoundError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from mlynar_events.events import StoredEvent, WebhookDisabled, key_filter
from mlynar_events.store import EventStore
from mlynar_events.webhooks import DELIVERIES_BUCKET, consumer_name

from agent_helpers import clean_env
from support import REPO, Api, CuttingProxy, wait_until

TOKEN = "webhook-test-token-0123456789"
FAST = dict(webhook_retry_base=0.01, webhook_retry_cap=0.05, webhook_max_failures=10_000)
"""Retries at once and never failing, unless a test says otherwise."""


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """A real HTTP receiver: records every POST to ``/hook/<name>`` and answers with
    ``status[name]`` (200 unless set), or holds it open while ``holds[name]`` is not set; it can
    be stopped (connection refused) and restarted on the same port."""

    port: int = 0
    status: dict[str, int] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    holds: dict[str, asyncio.Event] = field(default_factory=dict)
    held: list[Hit] = field(default_factory=list)
    gone: list[tuple[Hit, int]] = field(default_factory=list)
    """Held requests whose client went away, each with how many had been held by then."""
    runner: web.AppRunner | None = None

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook/{name}", self._handle)
        # a client that goes away cancels its handler: a held request knows it was given up
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hold = self.holds.get(name)
        if hold is not None and not hold.is_set():  # keep the request open: a delivery in flight
            hit = Hit(name, {k.lower(): v for k, v in request.headers.items()}, await request.read(), 0)
            self.held.append(hit)
            try:
                await hold.wait()
            except asyncio.CancelledError:
                self.gone.append((hit, len(self.held)))
                raise
            return web.Response(status=503)
        status = self.status.get(name, 200)
        self.hits.append(Hit(name, {k.lower(): v for k, v in request.headers.items()}, await request.read(), status))
        return web.Response(status=status)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    def of(self, name: str, ok_only: bool = True) -> list[Hit]:
        return [h for h in self.hits if h.path == name and (200 <= h.status < 300 or not ok_only)]


@pytest.fixture
async def receiver() -> Any:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


async def create(api: Api, **body: Any) -> dict[str, Any]:
    status, hook = await api.call("POST", "/api/webhooks", json=body)
    assert status == 201, hook
    return hook


async def created_seq(api: Api, webhook_id: str) -> int:
    return (await api.service.store.read(key_filter("webhook", webhook_id)))[0].seq


def verified(hit: Hit, *secrets: str) -> Any:
    """The CloudEvent in ``hit``, after checking its signature against each of ``secrets``
    (raises WebhookVerificationError otherwise)."""
    for secret in secrets:
        Webhook(secret).verify(hit.body, hit.headers)
    assert hit.headers["content-type"] == "application/cloudevents+json"
    event = JSONFormat().read(None, hit.body)
    assert event.get_id() == hit.headers["webhook-id"]
    return event


def in_order_once(hits: list[Hit]) -> list[str]:
    """The event ids delivered, with redeliveries folded: a repeat is allowed only as the exact
    same delivery right after the first (same webhook-id, same body)."""
    ids: list[str] = []
    for prev, hit in zip([None, *hits], hits):
        if prev is not None and prev.headers["webhook-id"] == hit.headers["webhook-id"]:
            assert prev.body == hit.body, "a redelivery must be the same event"
            continue
        ids.append(hit.headers["webhook-id"])
    assert len(ids) == len(set(ids)), "an event came again later, out of order"
    return ids


async def created_after(store: EventStore, webhook_id: str) -> list[str]:
    """The ids of the ``RunCreated`` events appended after the webhook was created: what a
    webhook on that type must get, in this order (for tests on service processes)."""
    created = (await store.read(key_filter("webhook", webhook_id)))[0].seq
    return [e.envelope.id for e in await store.read("mlynar.>", created + 1) if e.event.event_type == "RunCreated"]


async def expected_after(api: Api, seq: int, types: set[str] | None = None) -> list[StoredEvent]:
    events = [e for e in await api.service.store.read("mlynar.>", seq + 1)]
    return [e for e in events if types is None or e.event.event_type in types]


async def deliveries(api: Api, webhook_id: str) -> list[dict[str, Any]]:
    status, body = await api.call("GET", f"/api/webhooks/{webhook_id}/deliveries")
    assert status == 200, body
    return body


async def test_an_outage_and_a_restart_lose_nothing_and_keep_the_order(make_service, receiver: Receiver) -> None:
    receiver.status["all"] = 503
    api = await make_service(**FAST)
    everything = await create(api, url=receiver.url("all"), description="everything")
    secret = everything["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    created = await create(api, url=receiver.url("created"), types=["RunCreated"])
    await api.create_run()
    await api.create_run()
    await wait_until(lambda: _ready(len(receiver.of("all", ok_only=False)) >= 3), what="retries against 503")
    # the receiver goes away entirely: connection refused
    await receiver.stop()
    await api.create_run()
    await wait_until(lambda: _errors_include(api, everything["id"], "Connect"), what="a refused connection recorded")
    # the service restarts while the receiver is still down, with a backlog and an event in retry
    await api.http.close()
    await api.service.stop()
    api = await make_service(**FAST)
    await api.create_run()
    receiver.status["all"] = 200
    await receiver.start()
    await api.create_run()

    async def all_delivered() -> bool:
        want = {e.envelope.id for e in await expected_after(api, await created_seq(api, everything["id"]))}
        return want <= {h.headers["webhook-id"] for h in receiver.of("all")}

    await wait_until(all_delivered, what="every event delivered")
    expected = await expected_after(api, await created_seq(api, everything["id"]))
    got = receiver.of("all")
    assert in_order_once(got)[:len(expected)] == [e.envelope.id for e in expected]
    for hit in receiver.of("all", ok_only=False):  # the refused ones were signed too
        verified(hit, secret)
    by_id = {e.envelope.id: e for e in expected}
    for hit in got:
        event = verified(hit, secret)
        stored = by_id.get(event.get_id())
        if stored is not None:
            assert event.get_type() == "dev.mlynar." + stored.event.event_type
            assert event.get_extension("sequence") == f"{stored.seq:020d}"
            assert event.get_data() == stored.event.model_dump(mode="json")
    # the filtered webhook got exactly the RunCreated after its creation, in order
    want = await expected_after(api, await created_seq(api, created["id"]), {"RunCreated"})
    await wait_until(lambda: _ready(len(receiver.of("created")) >= len(want)), what="the filtered webhook")
    assert in_order_once(receiver.of("created")) == [e.envelope.id for e in want] and len(want) == 5
    for hit in receiver.of("created"):
        assert verified(hit, created["secret"]).get_type() == "dev.mlynar.RunCreated"


async def test_failing_after_n_failures_then_enable_resumes_where_it_stopped(make_service, receiver: Receiver) -> None:
    receiver.status["flaky"] = 500
    api = await make_service(**{**FAST, "webhook_max_failures": 3})
    hook = await create(api, url=receiver.url("flaky"), types=["RunCreated"])
    control = await create(api, url=receiver.url("control"), types=["RunCreated"])
    first = await api.create_run()

    async def failing() -> dict[str, Any] | None:
        status, body = await api.call("GET", f"/api/webhooks/{hook['id']}")
        return body if body["status"] == "failing" else None

    shown = await wait_until(failing, what="the webhook marked failing")
    assert shown["lastError"] == "HTTP 500" and shown["failingSince"]
    tries = receiver.of("flaky", ok_only=False)
    assert [h.status for h in tries] == [500, 500, 500]
    records = await deliveries(api, hook["id"])
    assert [(r["statusCode"], r["error"], r["attempt"]) for r in records] == [
        (500, "HTTP 500", 3), (500, "HTTP 500", 2), (500, "HTTP 500", 1)]
    assert all(r["type"] == "RunCreated" and r["latencyMs"] >= 0 for r in records)
    disabled = [e for e in await api.service.store.read(key_filter("webhook", hook["id"]))
                if isinstance(e.event, WebhookDisabled)]
    assert len(disabled) == 1 and disabled[0].event.failures == 3
    assert disabled[0].event.event_id == tries[0].headers["webhook-id"]
    # while failing it does not retry: the control webhook sees a later event, the flaky one nothing
    later = await api.create_run()
    await wait_until(lambda: _ready(any(verified(h).get_subject() == later for h in receiver.of("control"))),
                     what="the control webhook to get the later run")
    assert len(receiver.of("flaky", ok_only=False)) == 3
    # enabling resumes with the event it failed on, then everything after it, in order
    receiver.status["flaky"] = 200
    status, enabled = await api.call("POST", f"/api/webhooks/{hook['id']}/enable")
    assert status == 200 and enabled["status"] == "active" and enabled["lastError"] is None
    await wait_until(lambda: _ready(len(receiver.of("flaky")) >= 2), what="delivery after enabling")
    subjects = [verified(h, hook["secret"]).get_subject() for h in receiver.of("flaky")]
    assert subjects == [first, later]
    # enabling an active webhook changes nothing
    before = len(await api.service.store.read(key_filter("webhook", hook["id"])))
    assert (await api.call("POST", f"/api/webhooks/{hook['id']}/enable"))[0] == 200
    assert len(await api.service.store.read(key_filter("webhook", hook["id"]))) == before
    assert control["id"] != hook["id"]


async def test_rotation_signs_with_both_during_grace_and_no_secret_leaks(make_service, receiver: Receiver) -> None:
    api = await make_service(**FAST)
    hook = await create(api, url=receiver.url("r"), types=["RunCreated"], description="rotating")
    old = hook["secret"]

    async def delivered(run_id: str) -> Hit:
        async def find() -> Hit | None:
            return next((h for h in receiver.of("r") if verified(h).get_subject() == run_id), None)

        return await wait_until(find, what=f"delivery of {run_id}")

    verified(await delivered(await api.create_run()), old)
    status, rotated = await api.call("POST", f"/api/webhooks/{hook['id']}/rotate-secret")
    assert status == 201 and rotated["secret"] != old and rotated["previousSecretValidUntil"]
    new = rotated["secret"]
    during = await delivered(await api.create_run())
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    verified(during, old)
    verified(during, new)
    # a rotation without grace revokes the previous secrets at once (a leaked secret)
    status, revoked = await api.call("POST", f"/api/webhooks/{hook['id']}/rotate-secret",
                                     json={"gracePeriodSeconds": 0})
    assert status == 201
    newest = revoked["secret"]
    after = await delivered(await api.create_run())
    verified(after, newest)
    for stale in (old, new):
        with pytest.raises(WebhookVerificationError):
            verified(after, stale)
    # bad input changes nothing
    for body in ({"gracePeriodSeconds": -1}, {"grace": 5}, [1]):
        status, err = await api.call("POST", f"/api/webhooks/{hook['id']}/rotate-secret", json=body)
        assert status == 400 and err["error"], body
    # the secrets appear nowhere but in the creation and rotation answers
    secrets = [old, new, newest]
    needles = [s.encode() for s in secrets] + [s.removeprefix("whsec_").encode() for s in secrets]
    for stored in await api.service.store.read("mlynar.>"):
        assert not any(n in stored.envelope.to_bytes() for n in needles), stored.envelope.type
    kv = await api.service.store.js.key_value(DELIVERIES_BUCKET)

    async def recorded() -> bytes | None:  # successes are recorded within RECORD_EVERY
        with contextlib.suppress(KeyNotFoundError):
            value = (await kv.get(hook["id"])).value
            return value if value and len(json.loads(value)) >= 3 else None
        return None

    record = await wait_until(recorded, what="the three deliveries recorded")
    assert not any(n in record for n in needles)
    for path in ("/api/webhooks", f"/api/webhooks/{hook['id']}", f"/api/webhooks/{hook['id']}/deliveries"):
        async with api.http.get(path) as r:
            answer = await r.read()
            assert r.status == 200 and not any(n in answer for n in needles), path
    # deleting it stops delivery and removes its consumer and records
    status, _ = await api.call("DELETE", f"/api/webhooks/{hook['id']}")
    assert status == 200
    assert (await api.call("GET", f"/api/webhooks/{hook['id']}"))[0] == 404
    assert (await api.call("DELETE", f"/api/webhooks/{hook['id']}"))[0] == 404
    await wait_until(lambda: _consumer_gone(api, hook["id"]), what="the webhook's consumer removed")


async def test_deliveries_just_before_a_stop_are_in_the_records_after_it(make_service, receiver: Receiver) -> None:
    """Successes are recorded at most every RECORD_EVERY; a stopping dispatcher writes what is
    still unwritten, so a graceful stop right after deliveries loses none of their records."""
    api = await make_service(**FAST)
    hook = await create(api, url=receiver.url("last"), types=["RunCreated"])
    for _ in range(3):
        await api.create_run()
    await wait_until(lambda: _ready(len(receiver.of("last")) == 3), what="three deliveries")
    delivered = [h.headers["webhook-id"] for h in receiver.of("last")]
    await api.http.close()
    await api.service.stop()  # at once: the coalesced record is still pending
    api = await make_service(roles=["api", "projector"], **FAST)  # no dispatcher that could write again
    records = await deliveries(api, hook["id"])
    assert [r["eventId"] for r in records] == delivered[::-1]
    assert all(200 <= r["statusCode"] < 300 and r["error"] is None for r in records)


async def test_runs_and_types_filters_deliver_exactly_those_events(make_service, receiver: Receiver) -> None:
    api = await make_service(**FAST)
    r1, r2, other = await api.create_run(), await api.create_run(), await api.create_run()
    one = await create(api, url=receiver.url("one"), runs=[r1])
    term = await create(api, url=receiver.url("term"), runs=[r1, r2], types=["RunTerminationRequested"])
    for run_id in (r1, r2, other):
        status, body = await api.call("POST", f"/api/run/{run_id}/terminate")
        assert status < 300, body

    async def matching(hook: dict[str, Any], runs: set[str], types: set[str] | None) -> list[str]:
        events = await expected_after(api, await created_seq(api, hook["id"]), types)
        return [e.envelope.id for e in events if getattr(e.event, "run_id", None) in runs]

    async def delivered() -> bool:
        return (set(await matching(one, {r1}, None)) <= {h.headers["webhook-id"] for h in receiver.of("one")}
                and set(await matching(term, {r1, r2}, {"RunTerminationRequested"}))
                <= {h.headers["webhook-id"] for h in receiver.of("term")})

    await wait_until(delivered, what="the filtered deliveries")
    assert in_order_once(receiver.of("one")) == await matching(one, {r1}, None)
    assert in_order_once(receiver.of("term")) == await matching(term, {r1, r2}, {"RunTerminationRequested"})
    assert len(receiver.of("term")) >= 2
    assert {verified(h, one["secret"]).get_subject() for h in receiver.of("one")} == {r1}


class ServeProcess:
    """``mlynar serve`` as a child process (so it can be SIGKILLed), on an external NATS."""

    def __init__(self, tmp: Path, name: str, nats_url: str, *args: str, data: str = "data") -> None:
        self.log = tmp / f"{name}.log"
        argv = [sys.executable, "-m", "mlynar_events.cli", "serve", "--nats-url", nats_url, "--data-dir",
                str(tmp / data), "--port", "0", "--roles", "api,projector,webhooks", "--no-local-machine",
                "--log-format", "json", *args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    async def serving(self) -> str:
        async def api_url() -> str | None:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            for line in self.log.read_text().splitlines()[::-1]:
                if '"mlynar serving"' in line:
                    return json.loads(line)["api"]
            return None

        return await wait_until(api_url, 60, what="serve to serve")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


async def test_a_dispatcher_killed_mid_delivery_loses_nothing(nats_url: str, receiver: Receiver, tmp_path: Path) -> None:
    """SIGKILL while a delivery is in flight (the receiver holds the request): the next process
    gets the event again after --webhook-ack-wait and delivers everything in order."""
    hold = receiver.holds["k"] = asyncio.Event()
    held = receiver.held
    args = ("--webhook-ack-wait", "1", "--webhook-lease-ttl", "2", "--webhook-retry-base", "0.01", "--webhook-retry-cap", "0.05")
    first = ServeProcess(tmp_path, "first", nats_url, *args)
    second: ServeProcess | None = None
    try:
        async with aiohttp.ClientSession(await first.serving()) as http:
            api = Api(http, None)
            hook = await create(api, url=receiver.url("k"), types=["RunCreated"])
            runs = [await api.create_run(), await api.create_run()]
            await wait_until(lambda: _ready(held), what="a delivery in flight")
        first.kill()
        hold.set()
        second = ServeProcess(tmp_path, "second", nats_url, *args)
        await second.serving()
        await wait_until(lambda: _ready(len(receiver.of("k")) >= 2), what="deliveries after the restart")
        subjects = [verified(h, hook["secret"]).get_subject() for h in receiver.of("k")]
        assert subjects[:2] == runs and len(set(subjects)) == 2
        assert receiver.of("k")[0].headers["webhook-id"] == held[0].headers["webhook-id"]
    finally:
        hold.set()
        first.kill()
        if second is not None:
            second.proc.terminate()
            second.proc.wait(30)


PRIVATE = ["http://127.0.0.1:9/x", "http://localhost:9/x", "http://10.1.2.3/x", "http://192.168.0.1/x",
           "http://169.254.169.254/latest/meta-data", "http://[::1]:9/x", "http://[::ffff:127.0.0.1]/x",
           "http://0.0.0.0:9/x", "http://100.64.0.1/x"]
MALFORMED = [("ftp://93.184.216.34/x", "http or https"), ("http://user:pw@93.184.216.34/x", "credentials"),
             ("http://93.184.216.34/x#frag", "fragment"), ("http:///x", "no host"), ("not a url", "http or https")]


async def test_private_targets_are_refused_on_a_non_loopback_api(make_service, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    service = (await make_service(host="0.0.0.0", api_token_file=token_file, **FAST)).service
    port = int(service.api_url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        api = Api(http, service)
        for url in PRIVATE:
            status, err = await api.call("POST", "/api/webhooks", json={"url": url})
            assert status == 400 and "private, loopback or link-local" in err["error"], (url, err)
        for url, why in MALFORMED:
            status, err = await api.call("POST", "/api/webhooks", json={"url": url})
            assert status == 400 and why in err["error"], (url, err)
        bad_bodies = [{"url": "http://93.184.216.34/x", "types": ["NoSuchEvent"]},
                      {"url": "http://93.184.216.34/x", "runs": ["a.b"]},
                      {"url": "http://93.184.216.34/x", "runs": ["r1"], "types": ["MachineRegistered"]},
                      {"url": "http://93.184.216.34/x", "secret": "mine"}, {"types": []}]
        for body in bad_bodies:
            status, err = await api.call("POST", "/api/webhooks", json=body)
            assert status == 400 and err["error"], body
        assert (await api.call("GET", "/api/webhooks")) == (200, [])
        assert await service.store.read("mlynar.webhook.>") == []  # nothing was written
        # a public address is fine (a type that never happens here: nothing is sent to it)
        status, hook = await api.call("POST", "/api/webhooks", json={"url": "http://93.184.216.34/x",
                                                                     "types": ["RunDeleted"]})
        assert status == 201, hook
        assert (await api.call("DELETE", f"/api/webhooks/{hook['id']}"))[0] == 200


async def test_the_dispatcher_checks_the_target_again_at_delivery(make_service, receiver: Receiver,
                                                                  tmp_path: Path) -> None:
    """A webhook accepted by a loopback API is not sent by a dispatcher that is not
    loopback-only (its own rule, applied before every attempt)."""
    api = await make_service(roles=["api", "projector"], **FAST)
    hook = await create(api, url=receiver.url("inner"), types=["RunCreated"])
    await make_service(roles=["webhooks"], host="0.0.0.0", data_dir=tmp_path / "dispatcher",
                       **{**FAST, "webhook_max_failures": 2})
    await api.create_run()

    async def failing() -> bool:
        return (await api.call("GET", f"/api/webhooks/{hook['id']}"))[1]["status"] == "failing"

    await wait_until(failing, what="the webhook marked failing")
    assert receiver.hits == []
    records = await deliveries(api, hook["id"])
    assert len(records) == 2 and all("private, loopback or link-local" in r["error"] for r in records)
    assert all(r["statusCode"] is None for r in records)


async def test_an_allowed_private_target_on_a_non_loopback_api(make_service, receiver: Receiver,
                                                               tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    service = (await make_service(host="0.0.0.0", api_token_file=token_file, webhook_allow_private=True,
                                  **FAST)).service
    port = int(service.api_url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        api = Api(http, service)
        hook = await create(api, url=receiver.url("ok"), types=["RunCreated"])
        run_id = await api.create_run()
        await wait_until(lambda: _ready(receiver.of("ok")), what="delivery")
        assert verified(receiver.of("ok")[0], hook["secret"]).get_subject() == run_id


def readme_receiver() -> str:
    """The webhook receiver of the README, exactly as written there."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Webhooks", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_readme_receiver_verifies_and_parses_what_is_sent(make_service) -> None:
    api = await make_service(**FAST)
    port = free_port()
    hook = await create(api, url=f"http://127.0.0.1:{port}/hook", types=["RunCreated"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "-c", readme_receiver(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "WEBHOOK_SECRET": hook["secret"], "PORT": str(port)})
    try:
        runs = [await api.create_run(), await api.create_run()]
        lines: list[list[str]] = []
        while len(lines) < len(runs):  # run_app's own banner lines aside
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()  # type: ignore[union-attr]
            assert line, "the receiver ended"
            if line[0].startswith("dev.mlynar."):
                lines.append(line)
        assert [(line[0], line[1]) for line in lines] == [("dev.mlynar.RunCreated", r) for r in runs]
        # a forged delivery is refused by the snippet
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/hook", data=b"{}", headers={
                    "webhook-id": "x", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"}) as r:
                assert r.status >= 400
    finally:
        proc.terminate()
        await proc.wait()


async def _ready(value: Any) -> Any:
    return value


async def _errors_include(api: Api, webhook_id: str, text: str) -> bool:
    return any(text in (r["error"] or "") for r in await deliveries(api, webhook_id))


async def _consumer_gone(api: Api | EventStore, webhook_id: str) -> bool:
    from nats.js.errors import NotFoundError

    store = api if isinstance(api, EventStore) else api.service.store
    try:
        await store.js.consumer_info("MLYNAR", consumer_name(webhook_id))
    except NotFoundError:
        return True
    return False


async def test_a_members_webhook_gets_only_what_the_member_may_see(make_service, receiver: Receiver,
                                                                     tmp_path: Path) -> None:
    """Alice (a member) subscribes to everything: she gets her own runs' events, the registry's,
    and nothing of Bob's runs, of tokens or of webhooks; she cannot subscribe to Bob's run, and
    neither sees the other's webhooks. Deliveries are in order, so once her later run's events
    have arrived, Bob's earlier ones would have come first if they were going to."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    service = await make_service(api_token_file=token_file, **FAST)
    sessions: list[aiohttp.ClientSession] = []

    def as_token(token: str) -> Api:
        sessions.append(aiohttp.ClientSession(service.service.api_url, headers={"Authorization": f"Bearer {token}"}))
        return Api(sessions[-1], service.service)

    admin = as_token(TOKEN)
    try:
        people = {}
        for name in ("alice", "bob"):
            status, body = await admin.call("POST", "/api/tokens", json={"principal": name, "role": "member"})
            assert status == 201, body
            people[name] = as_token(body["token"])
        alice, bob = people["alice"], people["bob"]
        bobs_run = await bob.create_run()
        status, body = await alice.call("POST", "/api/webhooks", json={"url": receiver.url("a"), "runs": [bobs_run]})
        assert status == 404, body
        hook = await create(alice, url=receiver.url("a"))
        assert hook["owner"] == "alice"
        other = await create(bob, url=receiver.url("b"))
        assert [h["id"] for h in (await alice.call("GET", "/api/webhooks"))[1]] == [hook["id"]]
        assert (await alice.call("GET", f"/api/webhooks/{other['id']}"))[0] == 404
        assert (await alice.call("DELETE", f"/api/webhooks/{other['id']}"))[0] == 404
        assert {h["id"] for h in (await admin.call("GET", "/api/webhooks"))[1]} == {hook["id"], other["id"]}
        await bob.call("POST", f"/api/run/{bobs_run}/terminate")
        await admin.call("POST", "/api/tokens", json={"principal": "carol", "role": "viewer"})
        alices_run = await alice.create_run()
        await alice.call("POST", f"/api/run/{alices_run}/terminate")

        async def hers_arrived() -> bool:
            return any(verified(h, hook["secret"]).get_subject() == alices_run
                       and verified(h, hook["secret"]).get_type() == "dev.mlynar.RunTerminationRequested"
                       for h in receiver.of("a"))

        await wait_until(hers_arrived, what="alice's own run's events at her webhook")
        subjects = {verified(h, hook["secret"]).get_subject() for h in receiver.of("a")}
        types = {verified(h, hook["secret"]).get_type() for h in receiver.of("a")}
        assert alices_run in subjects and bobs_run not in subjects
        assert not any(t.startswith(("dev.mlynar.Token", "dev.mlynar.Webhook")) for t in types), types
    finally:
        for s in sessions:
            await s.close()


async def _attached(api: Api | EventStore, *hooks: dict[str, Any]) -> bool:
    """Every one of ``hooks`` is on the shared fan-out: it has no consumer of its own (``api``:
    the in-process service's, or a store on the NATS of service processes)."""
    return all([await _consumer_gone(api, hook["id"]) for hook in hooks])


async def test_a_slow_and_a_failing_receiver_hold_no_other_webhook(make_service, receiver: Receiver) -> None:
    """Three webhooks on the shared fan-out; one receiver then holds its request open, one
    answers 503. The third gets every later event while the slow one is still held; the other
    two continue on consumers of their own, get everything in order once they recover, and go
    back to the fan-out."""
    api = await make_service(**FAST)
    hooks = {name: await create(api, url=receiver.url(name), types=["RunCreated"]) for name in ("fast", "slow", "down")}

    def got(name: str, run_ids: list[str]) -> bool:
        return set(run_ids) <= {verified(h).get_subject() for h in receiver.of(name)}

    first = await api.create_run()
    await wait_until(lambda: _ready(all(got(name, [first]) for name in hooks)), what="the first run everywhere")
    await wait_until(lambda: _attached(api, *hooks.values()), what="every webhook on the fan-out")
    hold = receiver.holds["slow"] = asyncio.Event()
    receiver.status["down"] = 503
    runs = [await api.create_run() for _ in range(5)]

    await wait_until(lambda: _ready(got("fast", runs)), what="the fast webhook to get every run")
    assert not hold.is_set() and [verified(h).get_subject() for h in receiver.held] == runs[:1]
    assert not {verified(h).get_subject() for h in receiver.of("down")} & set(runs)
    assert any(h.status == 503 for h in receiver.of("down", ok_only=False))
    assert not await _consumer_gone(api, hooks["slow"]["id"]) and not await _consumer_gone(api, hooks["down"]["id"])
    hold.set()
    receiver.status["down"] = 200
    await wait_until(lambda: _ready(got("slow", runs) and got("down", runs)), what="the recovered webhooks to catch up")
    await wait_until(lambda: _attached(api, *hooks.values()), what="the recovered webhooks back on the fan-out")
    later = await api.create_run()
    await wait_until(lambda: _ready(all(got(name, [later]) for name in hooks)), what="an event after they are back")
    for name, hook in hooks.items():
        want = await expected_after(api, await created_seq(api, hook["id"]), {"RunCreated"})
        assert in_order_once(receiver.of(name)) == [e.envelope.id for e in want], name
        for hit in receiver.of(name):
            verified(hit, hook["secret"])


async def test_killing_the_delivering_replica_loses_nothing(nats_url: str, receiver: Receiver, tmp_path: Path) -> None:
    """Two replicas; the one holding the webhooks' lease is SIGKILLed while events are being
    fanned out. The other takes the lease over and delivers every event, in order."""
    from mlynar_events.lease import LEASES_BUCKET

    args = ("--webhook-ack-wait", "1", "--webhook-lease-ttl", "2", "--webhook-retry-base", "0.01",
            "--webhook-retry-cap", "0.05")
    procs = [ServeProcess(tmp_path, name, nats_url, *args, data=name) for name in ("a", "b")]
    store = await EventStore.connect(nats_url)
    try:
        urls = [await p.serving() for p in procs]

        async def leader() -> ServeProcess | None:
            with contextlib.suppress(Exception):
                holder = (await (await store.js.key_value(LEASES_BUCKET)).get("webhooks")).value.decode()
                return next((p for p in procs if f"-{p.proc.pid}-" in holder), None)
            return None

        first = await wait_until(leader, 30, what="one replica to hold the lease")
        survivor = procs[1 - procs.index(first)]
        async with aiohttp.ClientSession(urls[procs.index(survivor)]) as http:
            api = Api(http, None)
            hooks = [await create(api, url=receiver.url(f"h{i}"), types=["RunCreated"]) for i in range(2)]
            await api.create_run()

            await wait_until(lambda: _ready(receiver.of("h0") and receiver.of("h1")), 30, what="first deliveries")
            await wait_until(lambda: _attached(store, *hooks), 30, what="the webhooks on the fan-out")
            before = [await api.create_run() for _ in range(3)]
            first.kill()
            after = [await api.create_run() for _ in range(3)]

            async def taken_over() -> bool:
                return await leader() is survivor

            await wait_until(taken_over, 30, what="the lease taken over")

            async def all_delivered() -> bool:
                return all(set(before + after) <= {verified(h).get_subject() for h in receiver.of(f"h{i}")}
                           for i in range(2))

            await wait_until(all_delivered, 60, what="every event after the takeover")
        for i, hook in enumerate(hooks):
            assert in_order_once(receiver.of(f"h{i}")) == await created_after(store, hook["id"])
    finally:
        await store.close()
        for p in procs:
            p.kill()


async def test_the_fanout_goes_with_its_last_webhook_and_comes_back_for_a_new_one(make_service,
                                                                                   receiver: Receiver) -> None:
    """Deleting the last attached webhook removes the shared consumer (an idle one would fall
    behind); the next webhook gets a new one and only the events after its own creation."""
    from mlynar_events.webhooks import FANOUT_CONSUMER

    api = await make_service(**FAST)

    async def fanout_exists() -> bool:
        try:
            await api.service.store.js.consumer_info("MLYNAR", FANOUT_CONSUMER)
            return True
        except Exception:  # noqa: BLE001 - NotFoundError
            return False

    async def not_(check: Any) -> bool:
        return not await check()

    first = await create(api, url=receiver.url("first"), types=["RunCreated"])
    before = await api.create_run()
    await wait_until(lambda: _ready(receiver.of("first")), what="the first delivery")
    await wait_until(lambda: _attached(api, first), what="the first webhook on the fan-out")
    assert await fanout_exists()
    assert (await api.call("DELETE", f"/api/webhooks/{first['id']}"))[0] == 200
    between = await api.create_run()
    await wait_until(lambda: not_(fanout_exists), what="the fan-out removed with its last webhook")
    second = await create(api, url=receiver.url("second"), types=["RunCreated"])
    after = [await api.create_run()]
    await wait_until(lambda: _ready(receiver.of("second")), what="the second webhook's first delivery")
    await wait_until(lambda: _attached(api, second), what="the second webhook on the fan-out")
    after.append(await api.create_run())
    await wait_until(lambda: _ready(len(receiver.of("second")) >= 2), what="the second webhook's deliveries")
    assert await fanout_exists()
    assert [verified(h, second["secret"]).get_subject() for h in receiver.of("second")] == after
    assert before in {verified(h).get_subject() for h in receiver.of("first")}
    assert between not in {verified(h).get_subject() for h in receiver.of("second")}


async def test_the_fanout_is_handed_only_what_its_webhooks_want_and_widens_for_a_new_one(make_service,
                                                                                        receiver: Receiver) -> None:
    """The shared consumer's filters are the union of the attached webhooks': an event none of
    them wants is not handed to it at all. A webhook wanting other events widens them as it
    attaches, and from then on both get every event of theirs, once and in order."""
    from mlynar_events.webhooks import FANOUT_CONSUMER

    api = await make_service(**FAST)
    js = api.service.store.js

    async def fanout() -> Any:
        return await js.consumer_info("MLYNAR", FANOUT_CONSUMER)

    def subjects(name: str) -> list[str]:
        return [verified(h).get_subject() for h in receiver.of(name)]

    created = await create(api, url=receiver.url("created"), types=["RunCreated"])
    first = await api.create_run()
    await wait_until(lambda: _ready(subjects("created") == [first]), what="the first delivery")
    await wait_until(lambda: _attached(api, created), what="the first webhook on the fan-out")
    info = await fanout()
    assert info.config.filter_subject == "mlynar.run.*.RunCreated" and not info.config.filter_subjects
    handed = info.delivered.consumer_seq
    assert (await api.call("POST", f"/api/run/{first}/terminate"))[0] == 200  # wanted by no webhook yet
    second = await api.create_run()
    await wait_until(lambda: _ready(subjects("created") == [first, second]), what="the second run's delivery")
    assert (await fanout()).delivered.consumer_seq == handed + 1, "the fan-out was handed an unwanted event"

    ended = await create(api, url=receiver.url("ended"), types=["RunTerminationRequested"])
    assert (await api.call("POST", f"/api/run/{second}/terminate"))[0] == 200
    await wait_until(lambda: _ready(subjects("ended") == [second]), what="the second webhook's first delivery")
    await wait_until(lambda: _attached(api, created, ended), what="both webhooks on the fan-out")
    assert (await fanout()).config.filter_subjects == ["mlynar.run.*.RunCreated", "mlynar.run.*.RunTerminationRequested"]
    later = []
    for _ in range(3):
        later.append(await api.create_run())
        assert (await api.call("POST", f"/api/run/{later[-1]}/terminate"))[0] == 200
    await wait_until(lambda: _ready(subjects("created")[-3:] == later and subjects("ended")[-3:] == later),
                     what="every later event at both")
    for name, hook, wanted in (("created", created, "RunCreated"), ("ended", ended, "RunTerminationRequested")):
        want = await expected_after(api, await created_seq(api, hook["id"]), {wanted})
        assert in_order_once(receiver.of(name)) == [e.envelope.id for e in want], name


def test_the_fanout_filters_match_exactly_what_the_webhooks_filters_match() -> None:
    """For any webhooks' filters: a subject is handed to the fan-out iff some webhook's filters
    match it; covered filters are dropped; what is left never overlaps (JetStream refuses that),
    else the fan-out reads the whole stream."""
    import itertools

    from mlynar_events.webhooks import delivery_filters, fanout_filters, subject_matches

    choices = [([], []), (["RunCreated"], []), (["RunCreated", "StepSucceeded"], []), (["StepSucceeded"], ["r1"]),
               ([], ["r1"]), ([], ["r2"]), (["WebhookCreated"], []), (["RunCreated"], ["r2"]),
               (["TokenCreated", "TokenRevoked"], [])]
    subjects = [f"mlynar.run.{r}.{t}" for r in ("r1", "r2", "r3") for t in ("RunCreated", "StepSucceeded", "RunDeleted")]
    subjects += ["mlynar.webhook.w1.WebhookCreated", "mlynar.token.t1.TokenCreated", "mlynar.token.t1.TokenRevoked"]
    for k in (1, 2, 3):
        for combo in itertools.combinations(choices, k):
            sets = [delivery_filters(types, runs) for types, runs in combo]
            got = fanout_filters(sets)
            if got is None:
                union = sorted({f for s in sets for f in s})
                assert any(subject_matches(s, [a]) and subject_matches(s, [b])  # they do overlap
                           for s in subjects for a, b in itertools.combinations(union, 2)), combo
                continue
            for subject in subjects:
                assert subject_matches(subject, got) == any(subject_matches(subject, s) for s in sets), (combo, subject)
            assert len(got) == len(set(got)) and got == sorted(got)
    assert fanout_filters([["mlynar.run.*.RunCreated"], ["mlynar.run.>"]]) == ["mlynar.run.>"]
    assert fanout_filters([["mlynar.run.*.RunCreated"], ["mlynar.run.r1.>"]]) is None


async def test_a_leader_cut_off_from_nats_gives_up_before_another_takes_over(nats_url: str, receiver: Receiver,
                                                                            tmp_path: Path) -> None:
    """The leader loses NATS (a partition: its connections cut, new ones refused) while a
    delivery is in flight. Unable to renew its lease, it gives the delivery up (the receiver sees
    the request go away) before the standby, which takes over only once the lease has run out,
    sends that event again: never two deliverers at once. Nothing is lost or reordered."""
    from mlynar_events.lease import LEASES_BUCKET

    hold = receiver.holds["p"] = asyncio.Event()
    args = ("--webhook-ack-wait", "1", "--webhook-lease-ttl", "2", "--webhook-retry-base", "0.01",
            "--webhook-retry-cap", "0.05")
    proxy = CuttingProxy(nats_url)
    store = await EventStore.connect(nats_url)
    leader = ServeProcess(tmp_path, "leader", f"nats://127.0.0.1:{proxy.port}", *args, data="leader")
    standby: ServeProcess | None = None

    async def holds_lease(process: ServeProcess) -> bool:
        with contextlib.suppress(Exception):
            holder = (await (await store.js.key_value(LEASES_BUCKET)).get("webhooks")).value.decode()
            return f"-{process.proc.pid}-" in holder
        return False

    try:
        await leader.serving()
        await wait_until(lambda: holds_lease(leader), 30, what="the first replica to hold the lease")
        standby = ServeProcess(tmp_path, "standby", nats_url, *args, data="standby")
        async with aiohttp.ClientSession(await standby.serving()) as http:
            api = Api(http, None)
            hook = await create(api, url=receiver.url("p"), types=["RunCreated"])
            first = await api.create_run()
            await wait_until(lambda: _ready(len(receiver.held) == 1), 30, what="the leader's delivery held open")
            assert verified(receiver.held[0]).get_subject() == first
            proxy.close()
            later = [await api.create_run() for _ in range(2)]
            await wait_until(lambda: _ready(len(receiver.held) == 2), 30, what="the standby to send the event again")
            assert await holds_lease(standby)
            assert verified(receiver.held[1]).get_subject() == first
            assert [(hit, held) for hit, held in receiver.gone] == [(receiver.held[0], 1)], \
                "the cut-off leader was still delivering when the standby took over"
            hold.set()
            await wait_until(lambda: _ready([verified(h).get_subject() for h in receiver.of("p")] == [first, *later]),
                             30, what="every event, once the receiver answers")
        assert in_order_once(receiver.of("p")) == await created_after(store, hook["id"])
    finally:
        await store.close()
        proxy.close()
        leader.kill()
        if standby is not None:
            standby.kill()


async def test_a_changed_ack_wait_applies_to_the_consumers_that_already_exist(nats_url: str, receiver: Receiver,
                                                                             tmp_path: Path) -> None:
    """A restart with another --webhook-ack-wait updates the shared fan-out and a detached
    webhook's own consumer in place: their positions stay, and delivery goes on from there."""
    from mlynar_events.webhooks import FANOUT_CONSUMER

    receiver.status["down"] = 503
    fast = ("--webhook-retry-base", "0.01", "--webhook-retry-cap", "0.05")
    store = await EventStore.connect(nats_url)
    first = ServeProcess(tmp_path, "first", nats_url, "--webhook-ack-wait", "1", *fast)
    second: ServeProcess | None = None

    async def ack_waits() -> list[float]:
        return [(await store.js.consumer_info("MLYNAR", name)).config.ack_wait
                for name in (FANOUT_CONSUMER, consumer_name(down["id"]))]

    try:
        async with aiohttp.ClientSession(await first.serving()) as http:
            api = Api(http, None)
            up = await create(api, url=receiver.url("up"), types=["RunCreated"])
            down = await create(api, url=receiver.url("down"), types=["RunCreated"])
            before = await api.create_run()
            await wait_until(lambda: _ready(receiver.of("up") and receiver.of("down", ok_only=False)),
                             what="first deliveries")
            await wait_until(lambda: _attached(store, up), what="the working webhook on the fan-out")
        assert await ack_waits() == [1.0, 1.0]
        first.proc.terminate()
        first.proc.wait()
        second = ServeProcess(tmp_path, "second", nats_url, "--webhook-ack-wait", "4", *fast)
        async with aiohttp.ClientSession(await second.serving()) as http:
            api = Api(http, None)

            async def updated() -> bool:
                return await ack_waits() == [4.0, 4.0]

            await wait_until(updated, 30, what="both consumers updated to the new ack wait")
            receiver.status["down"] = 200
            later = await api.create_run()

            async def arrived() -> bool:
                return all({before, later} <= {verified(h).get_subject() for h in receiver.of(name)}
                           for name in ("up", "down"))

            await wait_until(arrived, 30, what="both webhooks to get both runs")
        for name, hook in (("up", up), ("down", down)):
            assert in_order_once(receiver.of(name)) == await created_after(store, hook["id"]), name
    finally:
        await store.close()
        first.kill()
        if second is not None:
            second.kill()
