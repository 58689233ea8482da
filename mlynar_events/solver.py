"""The solver: turns data in a run's pool into scheduled steps (the semantics of docs/ARCHITECTURE.md).

It follows the registry and run subjects from sequence 1 in order, folds every live run, and,
whenever it has caught up with the stream, decides for each run touched since: schedule input
sets up to the run's concurrency limit, complete a run that has nothing left, finish a
termination. Every decision is appended with the run's version as the expected last sequence, so
a decision made from stale state is refused by JetStream and simply made again when the newer
event arrives. Step ids are derived from (run, operator, input map), so two replicas deciding the
same thing append one event.

Input sets are found incrementally: a new unit only forms sets that contain it, with the other
slots filled from units that arrived before it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .events import (
    DataUnitAdded, Event, RunCompleted, RunDeleted, RunEvent, RunStarted, RunTerminated,
    RunTerminationRequested, StepInput, StepScheduled, StoredEvent, of_aggregate, subject_filters,
)
from . import metrics
from .registry import Registry
from .runstate import RunState
from .store import Appended, ConcurrencyConflict, EventStore

log = logging.getLogger("mlynar.solver")

InputMap = tuple[tuple[str, str], ...]  # ((fileLocationEnv, unit_id), ...) in spec order


def step_id_for(run_id: str, operator: str, inputs: InputMap) -> str:
    """Deterministic: the same fact gives the same id on every replica and every replay."""
    key = json.dumps([run_id, operator, sorted(inputs)], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:20]


@dataclass
class SolverRun:
    """A run as the solver sees it: the shared fold plus the candidates and waiting input sets."""

    state: RunState
    # eligible[(operator, kind)] = unit ids of that kind whose ancestors lack the operator, in
    # arrival order: the candidates of every input of that kind
    eligible: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    pending: "OrderedDict[str, tuple[str, InputMap]]" = field(default_factory=OrderedDict)
    awaiting_seq: int = 0  # our own appends not folded back yet: don't decide before they are
    ready_at: dict[str, float] = field(default_factory=dict)  # pending step id -> time of the event that queued it

    def apply(self, event: Event, seq: int, registry: Registry, at: float = 0.0) -> None:
        """``at``: the event's time (epoch seconds), when the sets it forms became schedulable."""
        was_started = self.state.started
        self.state.apply(event, seq)
        match event:
            case DataUnitAdded():
                new_sets = self._add_unit(event, registry)
                if self.state.started:
                    self._queue(new_sets, at)
            case RunStarted() if not was_started:
                self._queue(self._all_sets(registry), at)
            case StepScheduled():
                self.pending.pop(event.step_id, None)
                self.ready_at.pop(event.step_id, None)

    def _add_unit(self, unit: DataUnitAdded, registry: Registry) -> list[tuple[str, InputMap]]:
        sets: list[tuple[str, InputMap]] = []
        for op in registry.consumers.get(unit.data_kind, ()):
            if op in unit.ancestors:
                continue
            spec, _ = registry.operators[op]
            slots = [(i.fileLocationEnv, i.dataKind) for i in spec.inputs]
            # sets with the new unit in slot k, other slots from earlier units
            for k, (_, kind) in enumerate(slots):
                if kind != unit.data_kind:
                    continue
                choices = [
                    [unit.unit_id] if j == k else self._candidates(op, slot_kind, unit.unit_id)
                    for j, (_, slot_kind) in enumerate(slots)
                ]
                sets.extend(self._combine(op, slots, choices))
            self._candidates(op, unit.data_kind, unit.unit_id).append(unit.unit_id)
        return sets

    def _candidates(self, op: str, kind: str, exclude: str | None = None) -> list[str]:
        """Built on first use from the pool so far, so an operator declared mid-run still
        pairs new units with earlier ones; kept up to date by ``_add_unit`` afterwards."""
        found = self.eligible.get((op, kind))
        if found is None:
            found = self.eligible[(op, kind)] = [
                u.unit_id for u in self.state.units.values()
                if u.data_kind == kind and op not in u.ancestors and u.unit_id != exclude
            ]
        return found

    def _all_sets(self, registry: Registry) -> list[tuple[str, InputMap]]:
        sets: list[tuple[str, InputMap]] = []
        for op in sorted(registry.operators):
            spec, _ = registry.operators[op]
            slots = [(i.fileLocationEnv, i.dataKind) for i in spec.inputs]
            choices = [self._candidates(op, kind) for _, kind in slots]
            sets.extend(self._combine(op, slots, choices))
        return sets

    @staticmethod
    def _combine(op: str, slots: list[tuple[str, str]], choices: list[list[str]]) -> list[tuple[str, InputMap]]:
        out = []
        for combo in itertools.product(*choices):
            if len(set(combo)) == len(combo):  # never the same unit twice in one set
                out.append((op, tuple((env, uid) for (env, _), uid in zip(slots, combo))))
        return out

    def _queue(self, sets: list[tuple[str, InputMap]], at: float) -> None:
        for op, inputs in sets:
            sid = step_id_for(self.state.run_id, op, inputs)
            if sid not in self.state.steps and sid not in self.pending:
                self.pending[sid] = (op, inputs)
                self.ready_at[sid] = at


def build_step(run: RunState, registry: Registry, step_id: str, op: str, inputs: InputMap) -> StepScheduled:
    """The full step as the executor needs it: spec snapshot, inputs and environment."""
    spec, revision = registry.operators[op]
    params = run.params.get(op, {})
    env = {c.name: c.value for c in spec.constantEnv}
    env.update({c.name: params.get(c.name, c.defaultValue) for c in spec.configurableEnv})
    units = [run.units[uid] for _, uid in inputs]
    # lineage order, as the original Mlynar: the inputs' ancestors slot by slot (each once), then this operator
    ancestors = [*dict.fromkeys(a for u in units for a in u.ancestors if a != op), op]
    return StepScheduled(
        run_id=run.run_id, step_id=step_id, operator=op, revision=revision, spec=spec,
        inputs=[StepInput(env=env_name, unit_id=u.unit_id, data_kind=u.data_kind, blob=u.blob, filename=u.filename)
                for (env_name, _), u in zip(inputs, units)],
        env=env, ancestors=ancestors, owner=run.owner,
    )


class Solver:
    ACTOR = "solver"
    CONSUMES = (*of_aggregate("run"), *of_aggregate("datakind"), *of_aggregate("operator"))
    """Every run event (the fold) and the registry (which operators consume which kinds)."""
    DECIDE_EVERY = 512  # events folded while behind before deciding anyway

    def __init__(self, store: EventStore, *, max_steps_per_run: int = 10_000) -> None:
        self.store = store
        self.max_steps = max_steps_per_run
        self.registry = Registry()
        self.runs: dict[str, SolverRun] = {}
        self.dirty: set[str] = set()
        self.caught_up = asyncio.Event()
        self.decisions = 0

    async def run(self) -> None:
        sub = await self.store.subscribe(subject_filters(self.CONSUMES))
        metrics.INPUT_SETS_WAITING.add(self)
        if sub.start_head == 0:
            self.caught_up.set()
        since_decide = 0
        try:
            async for stored in sub:
                self.fold(stored)
                since_decide += 1
                if sub.pending == 0 or since_decide >= self.DECIDE_EVERY:
                    # caught up: nothing we follow is left (the stream's head itself may be an
                    # event we don't follow, e.g. a machine's, so its sequence is never seen)
                    if sub.pending == 0 or stored.seq >= sub.start_head:
                        self.caught_up.set()
                    if self.caught_up.is_set():
                        since_decide = 0
                        await self.decide_dirty()
        finally:
            metrics.INPUT_SETS_WAITING.discard(self)
            await sub.close()

    def waiting_sets(self) -> metrics.Samples:
        """``mlynar_solver_input_sets_waiting``: the input sets of running runs beyond the free
        slots of their ``maxParallel`` (read when scraped)."""
        waiting = 0
        for run in self.runs.values():
            s = run.state
            if run.pending and s.status == "running":
                waiting += max(0, len(run.pending) - max(0, s.max_parallel - s.active))
        return [((), float(waiting))]

    def fold(self, stored: StoredEvent) -> None:
        event = stored.event
        if self.registry.apply(event, stored.seq) or not isinstance(event, RunEvent):
            return
        if isinstance(event, RunDeleted):
            self.runs.pop(event.run_id, None)
            self.dirty.discard(event.run_id)
            return
        run = self.runs.get(event.run_id)
        if run is None:
            run = self.runs[event.run_id] = SolverRun(RunState(event.run_id))
        run.apply(event, stored.seq, self.registry, stored.time.timestamp())
        self.dirty.add(event.run_id)

    async def decide_dirty(self) -> None:
        """Decide every dirty run, the runs concurrently (their appends are independent; one
        run's appends stay in order, each expecting the previous one's sequence)."""
        dirty, self.dirty = self.dirty, set()
        ready = []
        for run_id in dirty:
            run = self.runs.get(run_id)
            if run is None:
                continue
            if run.state.version < run.awaiting_seq:
                self.dirty.add(run_id)  # our own appends are still on their way back
                continue
            ready.append(run)
        if len(ready) == 1:
            await self._decide_quietly(ready[0])
        elif ready:
            await asyncio.gather(*(self._decide_quietly(run) for run in ready))

    async def _decide_quietly(self, run: SolverRun) -> None:
        try:
            await self.decide(run)
        except ConcurrencyConflict:
            log.debug("run moved on; deciding again when its events arrive", extra={"run_id": run.state.run_id})

    async def decide(self, run: SolverRun) -> None:
        s = run.state
        expected = s.version

        async def append(event: Event, msg_id: str) -> Appended:
            nonlocal expected
            ack = await self.store.append(event, actor=self.ACTOR, msg_id=msg_id, expected_seq=expected)
            expected = ack.seq
            run.awaiting_seq = max(run.awaiting_seq, ack.seq)
            self.decisions += 1
            return ack

        if s.status == "terminated":
            if not s.terminated_final and s.active == 0:
                reason = s.termination.reason if s.termination else "terminated"
                await append(RunTerminated(run_id=s.run_id, reason=reason), f"{s.run_id}:terminated:{s.version}")
            return
        if s.status != "running":
            return
        if len(s.steps) + len(run.pending) > self.max_steps:
            reason = (f"run would exceed --max-steps-per-run={self.max_steps} "
                      f"({len(s.steps)} scheduled, {len(run.pending)} more waiting)")
            log.warning("terminating runaway run", extra={"run_id": s.run_id, "reason": reason})
            await append(RunTerminationRequested(run_id=s.run_id, cancel=False, reason=reason),
                         f"{s.run_id}:runaway")
            return
        started = time.perf_counter()
        scheduled = 0
        while run.pending and s.active + scheduled < s.max_parallel:
            step_id, (op, inputs) = next(iter(run.pending.items()))
            if op not in self.registry.operators:  # deleted since: drop the set
                run.pending.pop(step_id)
                run.ready_at.pop(step_id, None)
                continue
            ack = await append(build_step(s, self.registry, step_id, op, inputs), f"step:{step_id}")
            run.pending.pop(step_id)
            ready = run.ready_at.pop(step_id, None)
            if not ack.duplicate:  # another replica's decision is its own to count
                metrics.STEPS_SCHEDULED.labels(op).inc()
                if ready:
                    metrics.SCHEDULING_LATENCY.labels(op).observe(max(0.0, time.time() - ready))
            scheduled += 1
        if scheduled:
            log.info("scheduled steps", extra={"run_id": s.run_id, "count": scheduled,
                                                "ms": round((time.perf_counter() - started) * 1000, 2)})
        elif not run.pending and s.active == 0:
            await append(RunCompleted(run_id=s.run_id), f"{s.run_id}:complete:{s.version}")
            log.info("run complete", extra={"run_id": s.run_id})
