"""2. Replay: ``projections.projector.rebuild`` over N events vs a raw ordered-consumer read of
the same stream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nats.js import api as js_api

from mlynar_events.events import STREAM, Envelope
from mlynar_events.store import EventStore
from projections.projector import rebuild

from .common import Result, Sizes, embedded_nats, ratio, say
from .fixtures import history

TARGET = 0.30
WINDOW = 512


async def populate(store: EventStore, total: int) -> int:
    """Publish ``total`` realistic events, pipelined (``WINDOW`` acks in flight, one connection,
    so stream order = generation order)."""
    pending: list[asyncio.Future] = []
    for event in history(total):
        data = Envelope.wrap(event, "bench").to_bytes()
        pending.append(await store.js.publish_async(event.subject(), data))
        if len(pending) >= WINDOW:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return await store.last_seq()


async def raw_read(store: EventStore, head: int) -> float:
    """Every message of the stream through an ordered push consumer (what ``EventStore.subscribe``
    uses), counting only: seconds."""
    done = asyncio.Event()
    count = 0

    async def cb(msg) -> None:  # type: ignore[no-untyped-def]
        nonlocal count
        count += 1
        if msg.metadata.sequence.stream >= head:
            done.set()

    started = time.perf_counter()
    config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL, mem_storage=True)
    sub = await store.js.subscribe("mlynar.>", ordered_consumer=True, config=config, stream=STREAM, cb=cb,
                                   pending_msgs_limit=-1, pending_bytes_limit=-1)
    await done.wait()
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    assert count >= head, (count, head)
    return elapsed


async def bench(sizes: Sizes, tmp: Path) -> list[Result]:
    total = sizes.replay_events
    async with embedded_nats(tmp) as url:
        store = await EventStore.connect(url)
        try:
            t0 = time.perf_counter()
            head = await populate(store, total)
            say(f"  replay: {head} events stored in {time.perf_counter() - t0:.1f}s")
            raw_s = min([await raw_read(store, head) for _ in range(2)])
            t0 = time.perf_counter()
            applied = await rebuild(store, tmp / "rebuilt.sqlite3")
            ours_s = time.perf_counter() - t0
            assert applied == head, (applied, head)
        finally:
            await store.close()
    ours, raw = head / ours_s, head / raw_s
    r = ratio(ours, raw)
    return [Result("replay", ours, "events/s", raw, r, f"ratio >= {TARGET}", r is not None and r >= TARGET,
                   note=f"rebuild of {head} events into a fresh SQLite file; floor = ordered consumer, count only")]
