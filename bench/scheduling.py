"""3. Scheduling latency: from the ``DataUnitAdded`` append call to the moment a subscriber sees
the ``StepScheduled`` it caused, with 1 and with 100 concurrent runs. The solver runs alone
(``mlynar serve --roles solver``, a child process) and the operator names a machine nobody runs,
so nothing executes. Floor: a raw nats-py reactor (ordered consumer -> ``js.publish``) measured
the same way: the two JetStream hops any reacting consumer needs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from nats.js import api as js_api

from mlynar_events import registry as registry_commands
from mlynar_events.events import STREAM, RunCreated, RunStarted
from mlynar_events.specs import parse_document
from mlynar_events.store import EventStore

from .common import Result, ServeProcess, Sizes, embedded_nats, percentile, ratio, say
from .fixtures import OPERATOR, unit

P50_MS, P99_MS = 5.0, 25.0


class Watcher:
    """A core NATS subscription on the reaction subject: resolves the future of the unit id
    found in each message (JetStream publishes are ordinary messages on their subject)."""

    def __init__(self, store: EventStore, subject: str, key) -> None:  # type: ignore[no-untyped-def]
        self.store, self.subject, self.key = store, subject, key
        self.waiting: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        async def cb(msg) -> None:  # type: ignore[no-untyped-def]
            fut = self.waiting.pop(self.key(msg), None)
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())

        self.sub = await self.store.nc.subscribe(self.subject, cb=cb)

    def expect(self, unit_id: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[unit_id] = fut
        return fut


def _scheduled_unit(msg) -> str:  # type: ignore[no-untyped-def]
    return json.loads(msg.data)["data"]["inputs"][0]["unit_id"]


async def _measure(runs: list[str], rounds: int, append, watcher: Watcher) -> list[float]:  # type: ignore[no-untyped-def]
    """Each run appends ``rounds`` units one after the other, all runs at once; ms per unit."""
    out: list[float] = []

    async def one_run(run_id: str) -> None:
        for _ in range(rounds):
            u = unit(run_id)
            fut = watcher.expect(u.unit_id)
            t0 = time.perf_counter()
            await append(u)
            seen = await asyncio.wait_for(fut, 30)
            out.append((seen - t0) * 1000)

    await asyncio.gather(*(one_run(r) for r in runs))
    return out


async def _declare(store: EventStore) -> None:
    for doc in ({"kind": "DataKind", "metadata": {"name": "bench-in"}},
                {"kind": "DataKind", "metadata": {"name": "bench-out"}},
                {"kind": "Operator", "metadata": {"name": "bench-op"},
                 "spec": OPERATOR.model_dump(exclude_defaults=True)}):
        await registry_commands.declare(store, parse_document(doc), actor="bench")


async def _start_runs(store: EventStore, n: int) -> list[str]:
    runs = [str(uuid.uuid4()) for _ in range(n)]
    for run_id in runs:
        await store.append(RunCreated(run_id=run_id), actor="bench", expected_seq=0)
        await store.append(RunStarted(run_id=run_id, max_parallel=10_000), actor="bench")
    return runs


async def _ours(store: EventStore, sizes: Sizes) -> tuple[list[float], list[float]]:
    watcher = Watcher(store, "mlynar.run.*.StepScheduled", _scheduled_unit)
    await watcher.start()

    async def append(u) -> None:  # type: ignore[no-untyped-def]
        await store.append(u, actor="bench", msg_id=f"unit:{u.unit_id}")

    warm = await _start_runs(store, 1)
    await _measure(warm, 20, append, watcher)  # solver up, caches warm
    single = await _measure(await _start_runs(store, 1), sizes.sched_single, append, watcher)
    many = await _measure(await _start_runs(store, sizes.sched_runs), sizes.sched_rounds, append, watcher)
    return single, many


async def _floor(store: EventStore, sizes: Sizes) -> tuple[list[float], list[float]]:
    """A raw reactor: an ordered consumer on the input subjects publishing one event back."""
    reply = b"x" * 2000  # about a StepScheduled

    async def react(msg) -> None:  # type: ignore[no-untyped-def]
        run_id, unit_id = msg.subject.split(".")[3], msg.headers["U"]
        await store.js.publish(f"mlynar.rawreact.{run_id}.Out", reply, headers={"U": unit_id})

    config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW, mem_storage=True)
    sub = await store.js.subscribe("mlynar.rawreact.*.In", ordered_consumer=True, config=config, stream=STREAM,
                                   cb=react, pending_msgs_limit=-1, pending_bytes_limit=-1)
    watcher = Watcher(store, "mlynar.rawreact.*.Out", lambda m: m.headers["U"])
    await watcher.start()
    from mlynar_events.events import Envelope

    async def append(u) -> None:  # type: ignore[no-untyped-def]
        data = Envelope.wrap(u, "bench").to_bytes()
        await store.js.publish(f"mlynar.rawreact.{u.run_id}.In", data, headers={"U": u.unit_id})

    await _measure([str(uuid.uuid4())], 20, append, watcher)
    single = await _measure([str(uuid.uuid4())], sizes.sched_single, append, watcher)
    many = await _measure([str(uuid.uuid4()) for _ in range(sizes.sched_runs)], sizes.sched_rounds, append, watcher)
    await sub.unsubscribe()
    return single, many


async def bench(sizes: Sizes, tmp: Path) -> list[Result]:
    async with embedded_nats(tmp) as url:
        store = await EventStore.connect(url)
        try:
            await _declare(store)
            floor_single, floor_many = await _floor(store, sizes)
            async with ServeProcess(tmp / "solver", url, "solver", "--no-local-machine") as _:
                ours_single, ours_many = await _ours(store, sizes)
        finally:
            await store.close()
    say(f"  scheduling: {len(ours_single)} samples with 1 run, {len(ours_many)} with {sizes.sched_runs} runs")
    out = []
    for label, ours, floor in (("1 run", ours_single, floor_single),
                               (f"{sizes.sched_runs} runs", ours_many, floor_many)):
        for p, target in ((50, P50_MS), (99, P99_MS)):
            v, f = percentile(ours, p), percentile(floor, p)
            out.append(Result(f"scheduling p{p} ({label})", v, "ms", f, ratio(v, f), f"<= {target} ms", v <= target,
                              note="append(DataUnitAdded) -> StepScheduled seen; floor = raw reactor"))
    return out
