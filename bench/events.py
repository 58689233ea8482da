"""7. Event interface: how soon an SSE subscriber of ``GET /api/events`` sees an append, with C
subscribers connected at once to one ``mlynar serve --roles api,projector`` child process.

Each event is appended alone (the next one only when every subscriber has the previous), so this
is latency, not throughput: from just before ``publish`` to the moment a subscriber has parsed
the event's ``data:`` line. Floor: a bare nats-py core subscription on ``mlynar.>`` in this
process seeing the same appends, measured the same way in the same run."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import aiohttp
import nats

from mlynar_events.events import RunCreated
from mlynar_events.store import EventStore

from .common import Result, ServeProcess, Sizes, embedded_nats, percentile, ratio, say

TARGET_P99_MS = 20.0


class Subscriber:
    """One SSE client: records when each event id arrives."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.seen: dict[str, float] = {}
        self.ready = asyncio.Event()
        self.arrived = asyncio.Condition()

    async def run(self) -> None:
        async with self.http.get(self.url, headers={"Accept": "text/event-stream"},
                                 timeout=aiohttp.ClientTimeout(total=None)) as resp:
            async for raw in resp.content:
                line = raw.decode()
                if line.startswith(": connected"):
                    self.ready.set()
                elif line.startswith("data: "):
                    at = time.perf_counter()
                    event_id = json.loads(line[6:])["id"]
                    async with self.arrived:
                        self.seen[event_id] = at
                        self.arrived.notify_all()

    async def wait_for(self, event_id: str) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: event_id in self.seen), 30)


async def bench(sizes: Sizes, tmp: Path) -> list[Result]:
    clients, events = sizes.sse_clients, sizes.sse_events
    async with embedded_nats(tmp) as url:
        async with ServeProcess(tmp / "serve", url, "api,projector", "--no-local-machine") as service:
            store = await EventStore.connect(url)
            raw = await nats.connect(url)
            floor_seen: dict[str, float] = {}
            floor_arrived = asyncio.Condition()

            async def on_raw(msg) -> None:  # type: ignore[no-untyped-def]
                at = time.perf_counter()
                async with floor_arrived:
                    floor_seen[json.loads(msg.data)["id"]] = at
                    floor_arrived.notify_all()

            await raw.subscribe("mlynar.>", cb=on_raw)
            connector = aiohttp.TCPConnector(limit=clients + 1)
            http = aiohttp.ClientSession(connector=connector)
            subs = [Subscriber(http, f"{service.url}/api/events?type=RunCreated&after={await store.last_seq()}")
                    for _ in range(clients)]
            tasks = [asyncio.ensure_future(s.run()) for s in subs]
            try:
                await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subs)), 60)
                ours: list[float] = []
                floor: list[float] = []
                for n in range(events):
                    event_id = str(uuid.uuid4())
                    t0 = time.perf_counter()
                    await store.append(RunCreated(run_id=str(uuid.uuid4())), actor="bench", msg_id=event_id)
                    await asyncio.gather(*(s.wait_for(event_id) for s in subs))
                    async with floor_arrived:
                        await asyncio.wait_for(floor_arrived.wait_for(lambda: event_id in floor_seen), 30)
                    ours += [(s.seen[event_id] - t0) * 1000 for s in subs]
                    floor.append((floor_seen[event_id] - t0) * 1000)
                say(f"  events: {events} appends seen by {clients} SSE subscribers")
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await http.close()
                await raw.close()
                await store.close()
    note = f"{clients} SSE subscribers on one API process, {events} appends one at a time; floor = bare nats-py subscription"
    out = []
    for p in (50, 99):
        v, f = percentile(ours, p), percentile(floor, p)
        target = TARGET_P99_MS if p == 99 else None
        out.append(Result(f"SSE event latency p{p}", v, "ms", f, ratio(v, f),
                          f"<= {target:g} ms" if target else None, (v <= target) if target else None, note=note))
    return out
