"""1. Event append: ``EventStore.append`` vs raw ``js.publish`` of the same bytes, same
concurrency."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from mlynar_events.events import Envelope
from mlynar_events.store import EventStore

from .common import Result, Sizes, embedded_nats, ratio, say
from .fixtures import unit

TARGET = 0.70


async def _drive(n: int, concurrency: int, one) -> float:  # type: ignore[no-untyped-def]
    """``one(i)`` for i in range(n) from ``concurrency`` tasks; events per second."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


async def bench(sizes: Sizes, tmp: Path) -> list[Result]:
    n, conc = sizes.append_events, sizes.append_concurrency
    async with embedded_nats(tmp) as url:
        store = await EventStore.connect(url)
        try:
            run_id = str(uuid.uuid4())
            events = [unit(run_id) for _ in range(n)]
            sample = Envelope.wrap(events[0], "bench").to_bytes()
            payload = sample  # the same bytes our append sends, re-used: no encoding cost
            subject = events[0].subject()
            say(f"  append: {n} events of {len(payload)} B, {conc} concurrent publishers")

            async def ours(i: int) -> None:
                await store.append(events[i], actor="bench")

            async def raw(i: int) -> None:
                await store.js.publish(subject, payload, headers={"Nats-Msg-Id": f"raw-{i}-{uuid.uuid4()}"})

            # warm up both paths, then alternate rounds and keep each one's best
            await _drive(min(200, n), conc, raw)
            await _drive(min(200, n), conc, lambda i: store.append(unit(run_id), actor="bench"))
            best_raw = best_ours = 0.0
            for _ in range(2):
                best_raw = max(best_raw, await _drive(n, conc, raw))
                best_ours = max(best_ours, await _drive(n, conc, ours))
                events = [unit(run_id) for _ in range(n)]  # fresh ids: no de-duplication hits
        finally:
            await store.close()
    r = ratio(best_ours, best_raw)
    return [Result("append", best_ours, "events/s", best_raw, r, f"ratio >= {TARGET}", r is not None and r >= TARGET,
                   note=f"{conc} concurrent publishers, {len(payload)} B DataUnitAdded, floor = js.publish")]
