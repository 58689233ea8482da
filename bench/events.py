"""7. Event interface: how soon an SSE subscriber of ``GET /api/events`` sees an append, with C
subscribers connected at once to one ``mlynar serve --roles api,projector`` child process.

Each event is appended alone (the next one only when every subscriber has the previous), so this
is latency, not throughput: from just before ``publish`` to the moment the message's ``id:`` line
reaches a subscriber (a minimal socket client, :class:`Subscriber`). Floor: a bare nats-py core subscription on ``mlynar.>`` in this
process seeing the same appends, measured the same way in the same run."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Callable

import nats

from mlynar_events.events import RunCreated
from mlynar_events.store import EventStore

from .common import Result, ServeProcess, Sizes, embedded_nats, percentile, ratio, say

TARGET_P99_MS = 20.0


class Subscriber(asyncio.Protocol):
    """One SSE client, as small as a client can be: a socket protocol that sends the request and
    notes when each message's ``id:`` line (the stream sequence) arrives. 200 aiohttp clients
    parsing every message in this one process made the last of them see an event tens of
    milliseconds after the first only because they take turns on this process's event loop;
    that is the bench's cost, not the service's."""

    ID = re.compile(rb"(?:^|\n)id: (\d+)\n")

    def __init__(self, port: int, path: str, arrived: asyncio.Event) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        "Accept: text/event-stream\r\n\r\n").encode()
        self.seen: dict[int, float] = {}
        self.ready = asyncio.Event()
        self.arrived = arrived
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        at = time.perf_counter()
        self.buf += data
        end = 0
        for m in self.ID.finditer(self.buf):
            self.seen.setdefault(int(m[1]), at)
            end = m.end()
        if not self.ready.is_set() and b": connected" in self.buf:
            self.ready.set()
        self.buf = self.buf[end:][-4096:]
        self.arrived.set()


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
            loop = asyncio.get_running_loop()
            arrived = asyncio.Event()
            path = f"/api/events?type=RunCreated&after={await store.last_seq()}"
            subs = [Subscriber(service.port, path, arrived) for _ in range(clients)]
            for sub in subs:
                await loop.create_connection(lambda sub=sub: sub, "127.0.0.1", service.port)

            async def until(done: Callable[[], bool]) -> None:
                while not done():
                    arrived.clear()
                    if not done():
                        await asyncio.wait_for(arrived.wait(), 30)

            try:
                await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subs)), 60)
                ours: list[float] = []
                floor: list[float] = []
                for n in range(events):
                    event_id = str(uuid.uuid4())
                    t0 = time.perf_counter()
                    seq = (await store.append(RunCreated(run_id=str(uuid.uuid4())), actor="bench", msg_id=event_id)).seq
                    await until(lambda: all(seq in s.seen for s in subs))
                    async with floor_arrived:
                        await asyncio.wait_for(floor_arrived.wait_for(lambda: event_id in floor_seen), 30)
                    ours += [(s.seen[seq] - t0) * 1000 for s in subs]
                    floor.append((floor_seen[event_id] - t0) * 1000)
                say(f"  events: {events} appends seen by {clients} SSE subscribers")
            finally:
                for sub in subs:
                    if sub.transport is not None:
                        sub.transport.close()
                await raw.close()
                await store.close()
    note = (f"{clients} SSE subscribers (minimal socket clients) on one API process, {events} appends one at a "
            "time; floor = bare nats-py subscription")
    out = []
    for p in (50, 99):
        v, f = percentile(ours, p), percentile(floor, p)
        target = TARGET_P99_MS if p == 99 else None
        out.append(Result(f"SSE event latency p{p}", v, "ms", f, ratio(v, f),
                          f"<= {target:g} ms" if target else None, (v <= target) if target else None, note=note))
    return out
