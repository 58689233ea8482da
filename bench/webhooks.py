"""8. Webhooks: how soon a receiver gets an appended event, and what delivering costs the append
path. One ``mlynar serve --roles api,projector,webhooks`` child process; W webhooks on
``RunCreated``, all pointing at one aiohttp receiver in this process on 127.0.0.1.

* **Delivery latency**: each event is appended alone (the next one only when every webhook has
  the previous), from just before ``publish`` to the receiver's handler. Floor: a bare aiohttp
  client POSTing the same body to the same receiver, measured the same way in the same run.
* **Append path**: the append acknowledgement's latency while the W webhooks deliver every
  append, at a steady :data:`PACED_RATE` appends per second (W times that many deliveries a
  second). Its floor is the same appends while a bare deliverer in its own process
  (:data:`DELIVERER`: a nats-py pull consumer POSTing each event to the same W URLs) delivers
  them: the least any durable delivery makes the server and the machine do (a consumer of the
  stream, the HTTP traffic). What the dispatcher must not add is load beyond it. On one machine
  that floor is well above the bare appends' (a bare nats-py experiment on 2 cores: one more
  consumer alone doubles nats-server's CPU per append and raises the p99 by a third), so the
  same appends beside the POSTs alone (:data:`POSTER`, reading no stream) are reported too.
  The same appends with no traffic at all are reported next to it. A back-to-back burst is
  measured too, with no target: on a 2-core machine the burst's own floor (appender,
  nats-server, projector) already keeps both cores busy, so it measures how CPU is shared, not
  what the append path waits for.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

from nats.js.errors import NotFoundError

from mlynar_events.events import STREAM, RunCreated
from mlynar_events.store import EventStore

from mlynar_events.nats_server import free_port
from mlynar_events.webhooks import consumer_name

from .common import Result, ServeProcess, Sizes, embedded_nats, percentile, ratio, say

SINK = """
import sys
from aiohttp import web
count = 0
async def hook(request):
    global count
    await request.read()
    count += 1
    return web.Response(status=204)
async def bare(request):
    await request.read()
    return web.Response(status=204)
async def total(request):
    return web.json_response(count)
app = web.Application()
app.router.add_post("/hook/{name}", hook)
app.router.add_post("/bare/{name}", bare)
app.router.add_get("/count", total)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
"""The paced phases' and the burst's receiver, in its own process: the appends are timed in this
one, and a receiver answering thousands of POSTs on the same event loop would slow them down, not
the service. ``/count`` counts the webhooks' POSTs, not the bare client's (``/bare/...``)."""
POSTER = """
import asyncio, sys, time
import aiohttp
port, streams, rate, size = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
body = b"x" * size
async def stream(http, n, ready):
    start = time.perf_counter()
    for k in range(1, 1 << 62):
        async with http.post(f"http://127.0.0.1:{port}/bare/{n}", data=body) as r:
            await r.read()
        ready.set()
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
async def main():
    async with aiohttp.ClientSession() as http:
        ready = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.create_task(stream(http, n, ready[n])) for n in range(streams)]
        for event in ready:
            await event.wait()
        print("ready", flush=True)
        await asyncio.gather(*tasks)
asyncio.run(main())
"""
"""A floor's HTTP traffic alone: ``streams`` clients, each POSTing ``size`` bytes ``rate`` times
a second (one request in flight per client, like one webhook), until it is terminated. Its
POSTs are not timed by the appends: it is the traffic, not a delivery of them."""
DELIVERER = """
import asyncio, sys
import aiohttp, nats
from nats.js import api
port, streams, nats_url, subject, stream, durable = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
async def main():
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_consumer(stream, api.ConsumerConfig(
        durable_name=durable, filter_subject=subject, deliver_policy=api.DeliverPolicy.NEW,
        ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=1))
    psub = await js.pull_subscribe_bind(durable, stream=stream)
    async with aiohttp.ClientSession() as http:
        async def post(n, body):
            async with http.post(f"http://127.0.0.1:{port}/bare/{n}", data=body) as r:
                await r.read()
        await asyncio.gather(*(post(n, b"{}") for n in range(streams)))
        print("ready", flush=True)
        while True:
            try:
                msgs = await psub.fetch(batch=1, timeout=5)
            except asyncio.TimeoutError:
                continue
            for msg in msgs:
                await asyncio.gather(*(post(n, msg.data) for n in range(streams)))
                await msg.ack()
asyncio.run(main())
"""
"""The least a webhook delivery can be: a bare nats-py pull consumer (durable, one event
unacknowledged at a time: in order, at least once) that POSTs each event it gets to ``streams``
URLs of the receiver at once, then acks it. No signing, no records, no retries: what any
dispatcher, ours included, must at least make the server and the machine do per event."""
TARGET_P99_MS = 50.0
TARGET_APPEND_RATIO = 1.5
PACED_RATE = 100.0
"""Appends a second in the paced phases: with 10 webhooks, 1 000 deliveries a second."""
BARE_DURABLE = "bench-bare-deliverer"


class Receiver:
    """Records when each (webhook, event id) arrives; always answers 204."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self.bodies: dict[str, bytes] = {}
        self.arrived = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{name}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def handle(self, request: web.Request) -> web.Response:
        at = time.perf_counter()
        body = await request.read()
        event_id = request.headers.get("webhook-id", "floor")
        async with self.arrived:
            self.seen[(request.match_info["name"], event_id)] = at
            self.bodies.setdefault(event_id, body)
            self.arrived.notify_all()
        return web.Response(status=204)

    async def wait_for(self, keys: list[tuple[str, str]]) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: all(k in self.seen for k in keys)), 30)


async def _appends(store: EventStore, n: int, rate: float | None = None) -> list[float]:
    """``n`` appends, back to back or at ``rate`` a second (each due at its slot; a late one goes
    at once): each acknowledgement's latency (ms)."""
    latencies = []
    start = time.perf_counter()
    for k in range(n):
        delay = start + k / rate - time.perf_counter() if rate else 0.0
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load, not waiting for anything
        t0 = time.perf_counter()
        await store.append(RunCreated(run_id=str(uuid.uuid4())), actor="bench")
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


async def _appends_beside(store: EventStore, n: int, script: str, *argv: str) -> tuple[list[float], float]:
    """:func:`_appends` at :data:`PACED_RATE` while a floor's client (:data:`POSTER` or
    :data:`DELIVERER`, in its own process; it says "ready" once its HTTP connections are up)
    runs: the latencies, and the CPU seconds the client used meanwhile."""
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", script, *argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert client.stdout is not None
        line = await asyncio.wait_for(client.stdout.readline(), 30)
        assert line.strip() == b"ready", line
        cpu0 = _cpu(client.pid)
        latencies = await _appends(store, n, PACED_RATE)
        return latencies, _cpu(client.pid) - cpu0
    finally:
        client.terminate()
        await client.wait()


async def _on_the_fanout(store: EventStore, webhook_ids: list[str], timeout: float = 60.0) -> None:
    """Until none of the webhooks has a consumer of its own: they are delivered by the shared
    fan-out, the steady state the paced phase measures."""
    deadline = time.monotonic() + timeout
    pending = list(webhook_ids)
    while pending:
        try:
            await store.js.consumer_info(STREAM, consumer_name(pending[0]))
        except NotFoundError:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"webhook {pending[0]} still has its own consumer after {timeout}s")
        await asyncio.sleep(0.01)


def _pid_of(*words: bytes) -> int:
    """The process whose command line has every one of ``words`` (the nats-server of this run)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if all(w in cmd for w in words):
                return int(proc.name)
    raise RuntimeError(f"no process with {words}")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _wait_count(http: aiohttp.ClientSession, port: int, want: int, timeout: float = 120.0) -> None:
    """Until the sink has had ``want`` POSTs (it also answers before it is up: ``ClientError``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(f"http://127.0.0.1:{port}/count") as r:
                if await r.json() >= want:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.01)
    raise TimeoutError(f"the sink did not get {want} deliveries within {timeout}s")


async def bench(sizes: Sizes, tmp: Path) -> list[Result]:
    hooks, events, burst, paced, rounds = (2, 30, 200, 100, 1) if sizes.smoke else (10, 300, 2_000, 2_000, 4)
    receiver = Receiver()
    await receiver.start()
    sink_port = free_port()
    sink = await asyncio.create_subprocess_exec(sys.executable, "-c", SINK, str(sink_port))
    async with embedded_nats(tmp) as url:
        async with ServeProcess(tmp / "serve", url, "api,projector,webhooks", "--no-local-machine") as service:
            store = await EventStore.connect(url)
            http = aiohttp.ClientSession()
            try:
                await _appends(store, 50)  # warm-up: connections, the stream's first blocks
                quiet_paced = await _appends(store, paced, PACED_RATE)  # before any webhook: the floors
                quiet = await _appends(store, burst)
                names = [f"h{n}" for n in range(hooks)]
                for name in names:
                    async with http.post(f"{service.url}/api/webhooks", json={
                            "url": f"http://127.0.0.1:{receiver.port}/hook/{name}", "types": ["RunCreated"]}) as r:
                        assert r.status == 201, await r.text()
                ours: list[float] = []
                floor: list[float] = []
                for _ in range(events):
                    event_id = str(uuid.uuid4())
                    t0 = time.perf_counter()
                    await store.append(RunCreated(run_id=str(uuid.uuid4())), actor="bench", msg_id=event_id)
                    await receiver.wait_for([(name, event_id) for name in names])
                    ours += [(receiver.seen[(name, event_id)] - t0) * 1000 for name in names]
                    t1 = time.perf_counter()
                    async with http.post(f"http://127.0.0.1:{receiver.port}/hook/floor",
                                         data=receiver.bodies[event_id]) as r:
                        await r.read()
                    floor.append((receiver.seen.pop(("floor", "floor")) - t1) * 1000)
                async with http.get(f"{service.url}/api/webhooks") as r:  # the latency phase's go
                    for hook in await r.json():
                        async with http.delete(f"{service.url}/api/webhooks/{hook['id']}") as d:
                            assert d.status == 200
                size = len(next(iter(receiver.bodies.values())))
                await _wait_count(http, sink_port, 0)  # the sink is up
                nats_pid = _pid_of(b"nats-server", str(tmp).encode())
                posts_paced: list[float] = []
                bare_paced: list[float] = []
                busy_paced: list[float] = []
                cpu = {"poster": 0.0, "deliverer": 0.0, "nats posts": 0.0, "nats bare": 0.0, "serve": 0.0, "nats": 0.0}
                delivered, backlog = 0, 0.0
                subject = RunCreated(run_id="x").subject().replace(".x.", ".*.")
                for round_ in range(rounds):  # floors and measurement alternate: the machine's mood hits all
                    n = paced // rounds
                    nats0 = _cpu(nats_pid)
                    lat, client_cpu = await _appends_beside(store, n, POSTER, str(sink_port), str(hooks),
                                                            str(PACED_RATE), str(size))
                    posts_paced += lat
                    cpu["poster"] += client_cpu
                    cpu["nats posts"] += _cpu(nats_pid) - nats0
                    nats0 = _cpu(nats_pid)
                    lat, client_cpu = await _appends_beside(store, n, DELIVERER, str(sink_port), str(hooks), url,
                                                            subject, STREAM, BARE_DURABLE)
                    bare_paced += lat
                    cpu["deliverer"] += client_cpu
                    cpu["nats bare"] += _cpu(nats_pid) - nats0
                    await store.js.delete_consumer(STREAM, BARE_DURABLE)
                    ids = []
                    for name in names:  # the paced phase and the burst point at the sink
                        async with http.post(f"{service.url}/api/webhooks", json={
                                "url": f"http://127.0.0.1:{sink_port}/hook/{name}", "types": ["RunCreated"]}) as r:
                            assert r.status == 201, await r.text()
                            ids.append((await r.json())["id"])
                    await _appends(store, 1)  # each new webhook's first delivery; then it joins the fan-out
                    delivered += hooks
                    await _wait_count(http, sink_port, delivered)
                    await _on_the_fanout(store, ids)
                    serve0, nats0 = _cpu(service.pid), _cpu(nats_pid)
                    busy_paced += await _appends(store, n, PACED_RATE)  # while the webhooks deliver them
                    last = time.perf_counter()
                    delivered += hooks * n
                    await _wait_count(http, sink_port, delivered)
                    backlog = max(backlog, (time.perf_counter() - last) * 1000)
                    cpu["serve"] += _cpu(service.pid) - serve0
                    cpu["nats"] += _cpu(nats_pid) - nats0
                    if round_ < rounds - 1:  # the last round's webhooks take the burst
                        for webhook_id in ids:
                            async with http.delete(f"{service.url}/api/webhooks/{webhook_id}") as d:
                                assert d.status == 200
                busy = await _appends(store, burst)
                await _wait_count(http, sink_port, delivered + hooks * burst)
                say(f"  webhooks: {events} events to {hooks} webhooks one at a time, {paced} appends at "
                    f"{PACED_RATE:g}/s, bursts of {burst} appends")
            finally:
                await http.close()
                await store.close()
                sink.terminate()
                await sink.wait()
    assert receiver.runner is not None
    await receiver.runner.cleanup()
    note = (f"{hooks} webhooks on one dispatcher, {events} appends one at a time; "
            "floor = a bare aiohttp POST of the same body to the same receiver")
    out = []
    for p in (50, 99):
        v, f = percentile(ours, p), percentile(floor, p)
        target = TARGET_P99_MS if p == 99 else None
        out.append(Result(f"webhook delivery latency p{p}", v, "ms", f, ratio(v, f),
                          f"<= {target:g} ms" if target else None, (v <= target) if target else None, note=note))
    paced_note = (f"{paced} appends at {PACED_RATE:g}/s while {hooks} webhooks deliver each "
                  f"({hooks * PACED_RATE:g} deliveries/s), in {rounds} rounds alternating with the floor's")
    bare = (f"; floor = the same appends while a bare deliverer in its own process (a nats-py pull consumer, "
            f"one event unacked at a time, POSTing each event to the same {hooks} URLs at once, then acking) "
            "delivers them to the same receiver")
    for p in (50, 99):
        v, f = percentile(busy_paced, p), percentile(bare_paced, p)
        target = TARGET_APPEND_RATIO if p == 99 else None
        out.append(Result(f"webhook append ack p{p} while delivering", v, "ms", f, ratio(v, f),
                          f"<= {target:g}x floor" if target else None,
                          (ratio(v, f) is not None and v <= target * f) if target else None, note=paced_note + bare))
    v, f = percentile(busy_paced, 99), percentile(posts_paced, 99)
    out.append(Result("webhook append ack p99 while delivering, against the same POSTs alone", v, "ms", f, ratio(v, f),
                      note=paced_note + f"; floor = the same appends while a bare aiohttp client in its own process "
                      f"sends {hooks * PACED_RATE:g} POSTs/s of the same size to the same receiver, not timed by the "
                      "appends and reading no stream. No target: it lacks the consumer any durable delivery needs"))
    v, f = percentile(busy_paced, 99), percentile(quiet_paced, 99)
    out.append(Result("webhook append ack p99 while delivering, against no traffic", v, "ms", f, ratio(v, f),
                      note=paced_note + "; floor = the same appends with no webhook and no HTTP traffic. No target: on "
                      "one machine the HTTP traffic alone can raise this floor (the figures above have it in theirs)"))
    v, f = cpu["nats"] / paced * 1000, cpu["nats bare"] / paced * 1000
    out.append(Result("webhook nats-server CPU per append while delivering", v, "ms", f, ratio(v, f),
                      note=paced_note + bare + f"; CPU of the nats-server process the appends go to (beside the "
                           f"POSTs alone it used {cpu['nats posts'] / paced * 1000:.3f} ms). What a delivery costs the "
                           "append path's server: with a consumer per webhook this grew with the number of webhooks"))
    v, f = cpu["serve"] / (hooks * paced) * 1000, cpu["deliverer"] / (hooks * paced) * 1000
    out.append(Result("webhook service CPU per delivery", v, "ms", f, ratio(v, f),
                      note=paced_note + bare + "; CPU of the whole mlynar serve process (its projector too) per "
                           f"delivery, against the bare deliverer's (a bare POST alone: "
                           f"{cpu['poster'] / (hooks * paced) * 1000:.3f} ms)"))
    out.append(Result("webhook backlog after the last paced append", backlog, "ms",
                      note="from a round's last paced append's ack until the receiver had all its deliveries (the "
                           "largest of the rounds, sampled every 10 ms): deliveries keep up with the appends"))
    v, f = percentile(busy, 99), percentile(quiet, 99)
    out.append(Result("webhook append ack p99 during a delivery burst", v, "ms", f, ratio(v, f),
                      note=f"{burst} appends back to back while {hooks} webhooks deliver them "
                           f"({hooks * burst} deliveries); floor = the same burst before any webhook existed. "
                           "No target: the floor's burst alone keeps 2 cores busy, so this is CPU sharing"))
    return out
