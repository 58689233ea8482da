"""4. Solver scaling: CPU time (``time.process_time``) the solver spends per new unit when 100,
1 000 and 10 000 unrelated units (each with its step already scheduled) are in the run's pool.

The solver is driven in-process with a store that acknowledges appends at once, exactly as its
``run`` loop does: ``Solver.fold`` of the ``DataUnitAdded``, ``decide_dirty`` (which builds and
"appends" the ``StepScheduled``), and ``fold`` of that ``StepScheduled`` coming back. Decoding
and I/O are not counted. Ratio = CPU per unit at the largest pool / at the smallest."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from mlynar_events.events import (
    DataKindDeclared, Envelope, Event, OperatorDeclared, RunCreated, RunStarted, StoredEvent,
)
from mlynar_events.solver import Solver
from mlynar_events.specs import DataKindSpec
from mlynar_events.store import Appended

from .common import Result, Sizes, ratio, say
from .fixtures import OPERATOR, unit

TARGET = 1.5


class AckingStore:
    """Stands in for the event store: every append is acknowledged with the next sequence."""

    def __init__(self) -> None:
        self.seq = 0
        self.appended: list[tuple[int, Event]] = []

    def next(self) -> int:
        self.seq += 1
        return self.seq

    async def append(self, event: Event, *, actor: str, msg_id: str | None = None,
                     expected_seq: int | None = None) -> Appended:
        seq = self.next()
        self.appended.append((seq, event))
        return Appended(seq=seq, duplicate=False)


_ENVELOPE = Envelope.model_construct(id="bench", type="bench", schema_=1, actor="bench", data={})


def _stored(seq: int, event: Event) -> StoredEvent:
    """Without encoding: the solver reads ``seq`` and ``event`` only."""
    return StoredEvent(seq=seq, subject="", envelope=_ENVELOPE, event=event)


async def _feed(solver: Solver, store: AckingStore, stored: StoredEvent) -> None:
    """One turn of the solver's loop for one event, with its own appends folded back."""
    solver.fold(stored)
    await solver.decide_dirty()
    while store.appended:
        back, store.appended = store.appended, []
        for seq, event in back:
            solver.fold(_stored(seq, event))
        await solver.decide_dirty()


async def per_unit_cpu(pool: int, new_units: int) -> float:
    store = AckingStore()
    solver = Solver(store, max_steps_per_run=10**9)  # type: ignore[arg-type]
    run_id = str(uuid.uuid4())
    setup: list[Event] = [
        DataKindDeclared(name="bench-in", spec=DataKindSpec()),
        DataKindDeclared(name="bench-out", spec=DataKindSpec()),
        OperatorDeclared(name="bench-op", spec=OPERATOR, revision=1),
        RunCreated(run_id=run_id),
        RunStarted(run_id=run_id, max_parallel=10**9),
    ]
    for event in setup:
        await _feed(solver, store, _stored(store.next(), event))
    for _ in range(pool):
        await _feed(solver, store, _stored(store.next(), unit(run_id)))
    assert len(solver.runs[run_id].state.steps) == pool
    # prepared outside the measurement (decoding is not the solver's work)
    fresh = [unit(run_id) for _ in range(new_units)]
    cpu = 0.0
    for event in fresh:
        stored = _stored(store.next(), event)
        t0 = time.process_time()
        await _feed(solver, store, stored)
        cpu += time.process_time() - t0
    assert len(solver.runs[run_id].state.steps) == pool + new_units
    return cpu / new_units * 1e6


async def bench(sizes: Sizes, tmp: Path) -> list[Result]:
    await per_unit_cpu(min(sizes.solver_pools), sizes.solver_new_units)  # warm-up
    results: dict[int, float] = {}
    for _ in range(3):  # rounds over all pools, each pool keeps its best
        for pool in sizes.solver_pools:
            v = await per_unit_cpu(pool, sizes.solver_new_units)
            results[pool] = min(results.get(pool, v), v)
    for pool, v in results.items():
        say(f"  solver: pool {pool}: {v:.1f} us CPU per new unit")
    smallest, largest = min(results), max(results)
    out = [Result(f"solver CPU/unit (pool {p})", v, "us", results[smallest], ratio(v, results[smallest]),
                  note="fold + decide + fold-back, in-process; floor = the smallest pool")
           for p, v in sorted(results.items())]
    r = ratio(results[largest], results[smallest])
    out.append(Result("solver scaling", r or 0.0, "x", 1.0, r, f"<= {TARGET}", r is not None and r <= TARGET,
                      note=f"CPU per new unit at pool {largest} / at pool {smallest}"))
    return out
