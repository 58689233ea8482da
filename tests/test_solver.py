"""The solver against a brute-force model of Mlynar's turn loop, on a real nats-server.

Nothing of ours is mocked: the tests append registry and run events to the real stream, run real
``Solver`` instances (one or two replicas, each on its own connection), and play the executor
themselves: a task that follows ``StepScheduled`` and appends the outputs and the outcome, with
message ids so a redelivered step changes nothing. Outputs are a deterministic function of
(operator, input map) (``solver_reference.OpModel``), so the set of steps the solver ran can be
compared with the model's fixpoint exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

import pytest
from hypothesis import HealthCheck, event, given, note, reject, settings, strategies as st

from mlynar_events.events import (
    DataKindDeclared, DataUnitAdded, MachineRegistered, OperatorDeclared, OperatorDeleted, RunCompleted,
    RunCreated, RunStarted, RunTerminated, RunTerminationRequested, StepFailed, StepScheduled, StepStarted,
    StepSucceeded, StoredEvent,
)
from mlynar_events.runstate import RunState
from mlynar_events.solver import Solver
from mlynar_events.specs import DataKindSpec, OperatorSpec
from mlynar_events.tasks import cancel_and_wait
from mlynar_events.store import EventStore, run_filter
from solver_reference import OpModel, StepKey, TooManySteps, Unit, output_unit_id, solve, step_key
from support import wait_until

TIMEOUT = 30.0


# ---- the reference model on its own: hand-checked cases ----------------------------------------


def test_reference_adapters_stop_after_two_steps() -> None:
    ops = [OpModel("a-to-b", (("IN", "a"),), ("b",)), OpModel("b-to-a", (("IN", "b"),), ("a",))]
    out = solve(ops, [Unit("u0", "a")])
    assert sorted(op for op, _ in out.steps) == ["a-to-b", "b-to-a"]
    final = [u for u in out.units.values() if u.unit_id != "u0"]
    assert {u.kind: u.ancestors for u in final} == {"b": {"a-to-b"}, "a": {"a-to-b", "b-to-a"}}


def test_reference_operator_is_part_of_the_key_and_units_never_repeat() -> None:
    ops = [OpModel("x1", (("IN", "a"),)), OpModel("x2", (("IN", "a"),)),
           OpModel("cmp", (("L", "a"), ("R", "a")))]
    assert solve(ops, [Unit("u0", "a")]).steps == {step_key("x1", {"IN": "u0"}), step_key("x2", {"IN": "u0"})}
    two = solve(ops, [Unit("u0", "a"), Unit("u1", "a")]).steps
    assert {k for k in two if k[0] == "cmp"} == {step_key("cmp", {"L": "u0", "R": "u1"}),
                                                 step_key("cmp", {"L": "u1", "R": "u0"})}


def test_reference_fan_out_and_zero_input() -> None:
    ops = [OpModel("gen", (), ("whole",)), OpModel("split", (("IN", "whole"),), ("slice",), fanout=4),
           OpModel("each", (("IN", "slice"),)), OpModel("pair", (("S", "slice"), ("O", "other")))]
    out = solve(ops, [Unit("o", "other")])
    assert sorted(op for op, _ in out.steps) == ["each"] * 4 + ["gen"] + ["pair"] * 4 + ["split"]


# ---- harness ------------------------------------------------------------------------------------


class SolverReplica:
    """One solver on its own connection, as a separate replica would be."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.url, self.kwargs = url, kwargs
        self.store: EventStore | None = None
        self.solver: Solver | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> "SolverReplica":
        self.store = await EventStore.connect(self.url, name="test-solver")
        self.solver = Solver(self.store, **self.kwargs)
        self.task = asyncio.create_task(self.solver.run())
        return self

    def check(self) -> None:
        """Fail fast (rather than time out) when the solver task died."""
        if self.task is not None and self.task.done() and not self.task.cancelled():
            exc = self.task.exception()
            raise AssertionError(f"solver task ended: {exc!r}") from exc

    async def stop(self) -> None:
        if self.task is not None:
            assert not await cancel_and_wait([self.task]), "solver replica did not stop"
        if self.store is not None:
            await self.store.close()

    def folded(self, run_id: str, seq: int) -> bool:
        """Has this replica folded ``run_id`` up to ``seq``? Its loop folds and decides in turn, so
        from then on every decision it made from an older state is already in the stream."""
        run = self.solver.runs.get(run_id) if self.solver else None
        return run is not None and run.state.version >= seq


@pytest.fixture
async def replicas(nats_url: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[SolverReplica] = []

    async def start(n: int = 1, **kwargs: Any) -> list[SolverReplica]:
        new = [await SolverReplica(nats_url, **kwargs).start() for _ in range(n)]
        started.extend(new)
        return new

    try:
        yield start
    finally:
        for r in started:
            await r.stop()


def unit_event(run_id: str, unit_id: str, kind: str, ancestors: list[str] | None = None,
               step_id: str | None = None, index: int | None = None) -> DataUnitAdded:
    return DataUnitAdded(run_id=run_id, unit_id=unit_id, data_kind=kind, ancestors=ancestors or [],
                         blob=f"blobs/{unit_id}", size=0, sha256="0" * 64, step_id=step_id, output_index=index)


async def declare(store: EventStore, ops: list[OpModel], kinds: set[str] | None = None) -> None:
    kinds = set(kinds or ()) | {k for op in ops for _, k in op.inputs} | {k for op in ops for k in op.outputs}
    for kind in sorted(kinds):
        await store.append(DataKindDeclared(name=kind, spec=DataKindSpec()), actor="test")
    for op in ops:
        await store.append(OperatorDeclared(name=op.name, spec=OperatorSpec.model_validate(op.spec()), revision=1),
                           actor="test")


async def upload(store: EventStore, run_id: str, unit: Unit) -> int:
    ack = await store.append(unit_event(run_id, unit.unit_id, unit.kind), actor="test",
                             msg_id=f"{run_id}:upload:{unit.unit_id}")
    return ack.seq


async def create_run(store: EventStore, run_id: str, units: list[Unit] = (), *, start: bool = True,
                     max_parallel: int = 8) -> None:
    await store.append(RunCreated(run_id=run_id), actor="test")
    for unit in units:
        await upload(store, run_id, unit)
    if start:
        await store.append(RunStarted(run_id=run_id, max_parallel=max_parallel), actor="test")


class History:
    """Every event of one run, in stream order, as it happens."""

    def __init__(self, store: EventStore, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.events: list[StoredEvent] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> "History":
        sub = await self.store.subscribe(run_filter(self.run_id))

        async def follow() -> None:
            try:
                async for stored in sub:
                    self.events.append(stored)
            finally:
                await sub.close()

        self.task = asyncio.create_task(follow())
        return self

    async def stop(self) -> None:
        if self.task:
            await cancel_and_wait([self.task])

    def of(self, *types: type) -> list[StoredEvent]:
        return [e for e in self.events if isinstance(e.event, types)]

    async def wait_for(self, cls: type, count: int = 1, *, checks: list[SolverReplica] = (),
                       timeout: float = TIMEOUT) -> StoredEvent:
        async def seen() -> StoredEvent | None:
            for r in checks:
                r.check()
            found = self.of(cls)
            return found[count - 1] if len(found) >= count else None

        return await wait_until(seen, timeout, what=f"{count}x {cls.__name__} in run {self.run_id}")


class Executor:
    """Plays the executors: follows the run's ``StepScheduled`` and appends ``StepStarted``, the
    outputs (ids from the step's content and output index, ancestors from the event) and
    ``StepSucceeded`` (or ``StepFailed``), each with a message id, so running a step twice
    (redelivery) appends nothing new. Steps are taken in random batches and finished
    concurrently in shuffled order. ``auto=False`` holds every step until :meth:`release`."""

    def __init__(self, store: EventStore, run_id: str, ops: list[OpModel], *, seed: int = 0,
                 auto: bool = True, redeliver: float = 0.0,
                 before_first: Callable[[], Any] | None = None) -> None:
        self.store, self.run_id = store, run_id
        self.ops = {op.name: op for op in ops}
        self.rng = random.Random(seed)
        self.redeliver = redeliver
        self.before_first = before_first
        self.scheduled: list[StepScheduled] = []
        self.held: list[StepScheduled] = []
        self.auto = auto
        self.queue: asyncio.Queue[StepScheduled] = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.errors: list[BaseException] = []

    async def start(self) -> "Executor":
        sub = await self.store.subscribe(f"mlynar.run.{self.run_id}.StepScheduled")

        async def follow() -> None:
            try:
                async for stored in sub:
                    self.scheduled.append(stored.event)
                    self.queue.put_nowait(stored.event)
            finally:
                await sub.close()

        self._spawn(follow())
        self._spawn(self._work())
        return self

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())

    def check(self) -> None:
        if self.errors:
            raise AssertionError(f"test executor failed: {self.errors[0]!r}") from self.errors[0]

    async def _work(self) -> None:
        while True:
            batch = [await self.queue.get()]
            for _ in range(self.rng.randint(0, 3)):  # let a few more arrive: random batch sizes
                await asyncio.sleep(0)
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if self.before_first is not None:
                hook, self.before_first = self.before_first, None
                await hook()
            if not self.auto:
                self.held.extend(batch)
                continue
            self.rng.shuffle(batch)
            for step in batch:
                self._spawn(self._finish_later(step, self.rng.random() * 0.004, self.rng.random() < self.redeliver))

    async def _finish_later(self, step: StepScheduled, delay: float, twice: bool) -> None:
        await asyncio.sleep(delay)  # jitter so steps finish out of order, not a wait for anything
        await self.finish(step)
        if twice:
            await self.finish(step)

    def key(self, step: StepScheduled) -> StepKey:
        return step_key(step.operator, [(i.env, i.unit_id) for i in step.inputs])

    async def finish(self, step: StepScheduled) -> None:
        sid, run_id = step.step_id, self.run_id
        await self.store.append(
            StepStarted(run_id=run_id, step_id=sid, attempt=1, executor="test", target="machine:m", external_id=sid),
            actor="test-executor", msg_id=f"{sid}:started")
        op = self.ops[step.operator]
        if op.fail:
            await self.store.append(StepFailed(run_id=run_id, step_id=sid, attempt=1, error="boom"),
                                    actor="test-executor", msg_id=f"{sid}:outcome")
            return
        outputs = op.results(self.key(step))
        for i, (unit_id, kind) in enumerate(outputs):
            await self.store.append(unit_event(run_id, unit_id, kind, list(step.ancestors), sid, i),
                                    actor="test-executor", msg_id=f"{sid}:out:{i}")
        await self.store.append(StepSucceeded(run_id=run_id, step_id=sid, attempt=1, outputs=[u for u, _ in outputs]),
                                actor="test-executor", msg_id=f"{sid}:outcome")

    async def release(self) -> None:
        """Finish the held steps and every later one automatically."""
        self.auto = True
        held, self.held = self.held, []
        for step in held:
            await self.finish(step)

    async def wait_scheduled(self, n: int, timeout: float = TIMEOUT) -> list[StepScheduled]:
        async def enough() -> list[StepScheduled] | None:
            self.check()
            return list(self.scheduled) if len(self.scheduled) >= n else None

        return await wait_until(enough, timeout, what=f"{n} steps scheduled in run {self.run_id}")

    async def stop(self) -> None:
        await cancel_and_wait(list(self.tasks))


async def quiesce(store: EventStore, run_id: str, replicas: list[SolverReplica]) -> list[StoredEvent]:
    """The run's full history once every live replica has folded all of it: nothing decided from
    an older state can still be on its way."""
    async def settled() -> list[StoredEvent] | None:
        events, version = await store.load_run(run_id)
        live = [r for r in replicas if r.task is not None and not r.task.done()]
        for r in replicas:
            r.check()
        return events if all(r.folded(run_id, version) for r in live) else None

    events = await wait_until(settled, TIMEOUT, what=f"solvers to fold all of run {run_id}")
    final, _ = await store.load_run(run_id)
    assert len(final) == len(events), "a solver appended after the run settled"
    return final


def scheduled_keys(events: list[StoredEvent]) -> list[StepKey]:
    return [step_key(e.event.operator, [(i.env, i.unit_id) for i in e.event.inputs])
            for e in events if isinstance(e.event, StepScheduled)]


def check_history(events: list[StoredEvent], max_parallel: int) -> None:
    """Invariants of any run's history: no step scheduled twice (by id or by input set), never
    more than ``max_parallel`` steps active, no outcome for an unknown step, one outcome each."""
    steps = [e.event for e in events if isinstance(e.event, StepScheduled)]
    ids = [s.step_id for s in steps]
    assert len(ids) == len(set(ids)), f"step scheduled twice: {[i for i in ids if ids.count(i) > 1]}"
    keys = scheduled_keys(events)
    assert len(keys) == len(set(keys)), "the same (operator, input map) was scheduled under two ids"
    for s in steps:  # never the same unit twice in one set
        assert len({i.unit_id for i in s.inputs}) == len(s.inputs), s
    active: set[str] = set()
    finished: set[str] = set()
    peak = 0
    for e in events:
        ev = e.event
        if isinstance(ev, StepScheduled):
            active.add(ev.step_id)
            peak = max(peak, len(active))
            assert peak <= max_parallel, f"{len(active)} steps active at seq {e.seq}, limit {max_parallel}"
        elif isinstance(ev, (StepSucceeded, StepFailed)):
            assert ev.step_id in active, f"outcome of a step not active: {ev.step_id}"
            assert ev.step_id not in finished
            active.discard(ev.step_id)
            finished.add(ev.step_id)
        elif isinstance(ev, RunCompleted):
            assert not active, f"RunCompleted at seq {e.seq} with steps {sorted(active)} still active"


# ---- the property: real solver (two replicas) == reference ------------------------------------


@dataclass(frozen=True)
class Scenario:
    ops: tuple[OpModel, ...]
    kinds: tuple[str, ...]
    uploads: tuple[Unit, ...]
    late: int  # this many of the uploads arrive after RunStarted, while a step is active
    max_parallel: int
    seed: int
    redeliver: float
    adapters: bool = False


@st.composite
def scenarios(draw: Any) -> Scenario:
    kinds = [f"k{i}" for i in range(draw(st.integers(2, 3)))]
    kind = st.sampled_from(kinds)
    ops: list[OpModel] = []
    for j in range(draw(st.integers(1, 5))):
        n_inputs = draw(st.sampled_from([1, 2, 1, 2, 0]))
        ops.append(OpModel(
            name=f"op{j}",
            inputs=tuple((f"IN{i}", draw(kind)) for i in range(n_inputs)),
            outputs=tuple(draw(st.lists(kind, max_size=2))),  # empty: can never produce anything
            fanout=draw(st.sampled_from([1, 2, 3, 0])),
            hashed=draw(st.booleans()),  # the number of outputs depends on the inputs
            fail=draw(st.sampled_from([False, False, False, True])),
        ))
    adapters = draw(st.booleans())
    if adapters:  # a cycle through adapters: A -> B and B -> A
        a, b = draw(st.permutations(kinds))[:2]
        ops += [OpModel(f"{a}-to-{b}", (("IN", a),), (b,), fanout=draw(st.integers(1, 2))),
                OpModel(f"{b}-to-{a}", (("IN", b),), (a,))]
    uploads = [Unit(f"u{i}", k) for i, k in enumerate(draw(st.lists(kind, min_size=1, max_size=4)))]
    return Scenario(
        ops=tuple(ops), kinds=tuple(kinds), uploads=tuple(uploads),
        late=draw(st.integers(0, len(uploads) - 1)), max_parallel=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**32 - 1)), redeliver=draw(st.sampled_from([0.0, 0.3])), adapters=adapters,
    )


def prefixed(s: Scenario, p: str) -> Scenario:
    """Names unique to one example: operators and kinds are global, runs share the stream."""
    def k(kind: str) -> str:
        return f"{p}-{kind}"

    ops = tuple(replace(op, name=f"{p}-{op.name}", inputs=tuple((env, k(kd)) for env, kd in op.inputs),
                        outputs=tuple(map(k, op.outputs))) for op in s.ops)
    return replace(s, ops=ops, kinds=tuple(map(k, s.kinds)), uploads=tuple(replace(u, kind=k(u.kind)) for u in s.uploads))


_examples = itertools.count()
MAX_REFERENCE_STEPS = 80


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(scenario=scenarios())
async def test_solver_matches_reference(store: EventStore, shared_replicas: list[SolverReplica],
                                        scenario: Scenario) -> None:
    n = next(_examples)
    s = prefixed(scenario, f"p{n}")
    try:
        expected = solve(list(s.ops), list(s.uploads), limit=MAX_REFERENCE_STEPS)
    except TooManySteps:
        reject()
    early, late = list(s.uploads[: len(s.uploads) - s.late]), list(s.uploads[len(s.uploads) - s.late:])
    if late and not solve(list(s.ops), early).steps:
        early, late = list(s.uploads), []  # late uploads need an active step to arrive during
    note(f"ops={s.ops}\nuploads early={early} late={late} max_parallel={s.max_parallel}\n"
         f"expected {len(expected.steps)} steps")
    steps = len(expected.steps)
    event(f"reference steps: {'0' if not steps else '1-5' if steps <= 5 else '6-20' if steps <= 20 else '21+'}")
    for feature, present in [
        ("two-input operator ran", any(len(inputs) == 2 for _, inputs in expected.steps)),
        ("zero-input operator ran", any(not inputs for _, inputs in expected.steps)),
        ("adapter cycle", s.adapters),
        ("redelivered steps", s.redeliver > 0),
        ("late uploads", bool(late)),
        ("held back by max_parallel", steps > s.max_parallel),
    ]:
        if present:
            event(feature)
    run_id = f"prop-{n}-{uuid.uuid4().hex[:8]}"

    await declare(store, list(s.ops), set(s.kinds))
    history = await History(store, run_id).start()

    async def upload_late() -> None:
        for unit in late:
            await upload(store, run_id, unit)

    executor = await Executor(store, run_id, list(s.ops), seed=s.seed, redeliver=s.redeliver,
                              before_first=upload_late if late else None).start()
    try:
        await create_run(store, run_id, early, max_parallel=s.max_parallel)

        async def completed() -> bool:
            executor.check()
            for r in shared_replicas:
                r.check()
            return bool(history.of(RunCompleted))

        await wait_until(completed, TIMEOUT, what=f"run {run_id} to complete")
        events = await quiesce(store, run_id, shared_replicas)
    finally:
        await executor.stop()
        await history.stop()
        # the operators leave the registry, so zero-input ones don't run in later examples' runs
        for op in s.ops:
            await store.append(OperatorDeleted(name=op.name), actor="test")

    check_history(events, s.max_parallel)
    keys = scheduled_keys(events)
    assert set(keys) == expected.steps, (
        f"missing {expected.steps - set(keys)}\nextra {set(keys) - expected.steps}")
    assert len([e for e in events if isinstance(e.event, RunCompleted)]) == 1
    assert isinstance(events[-1].event, RunCompleted)
    for e in events:  # each step's ancestors: its inputs' ancestors plus the operator
        if isinstance(e.event, StepScheduled):
            assert set(e.event.ancestors) == expected.step_ancestors[scheduled_keys([e])[0]]
    units = {e.event.unit_id for e in events if isinstance(e.event, DataUnitAdded)}
    assert units == set(expected.units)
    assert len([e for e in events if isinstance(e.event, DataUnitAdded)]) == len(units), "a unit added twice"


@pytest.fixture
async def shared_replicas(replicas: Callable[..., Any]) -> list[SolverReplica]:
    """Two solver replicas on the same stream, shared by every example of the property."""
    return await replicas(2)


# ---- deterministic scenarios --------------------------------------------------------------------


@dataclass
class Scene:
    store: EventStore
    ops: list[OpModel]
    run_id: str = field(default_factory=lambda: f"run-{uuid.uuid4().hex[:10]}")
    history: History | None = None
    executor: Executor | None = None

    async def open(self, **executor_kwargs: Any) -> "Scene":
        self.history = await History(self.store, self.run_id).start()
        self.executor = await Executor(self.store, self.run_id, self.ops, **executor_kwargs).start()
        return self

    async def close(self) -> None:
        if self.executor:
            await self.executor.stop()
        if self.history:
            await self.history.stop()


@pytest.fixture
async def scenes(store: EventStore) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Scene] = []

    async def open_scene(ops: list[OpModel], **kwargs: Any) -> Scene:
        scene = await Scene(store, ops).open(**kwargs)
        opened.append(scene)
        return scene

    try:
        yield open_scene
    finally:
        for scene in opened:
            await scene.close()


FAN_OUT = [
    OpModel("split", (("WHOLE", "whole"),), ("slice",), fanout=5),
    OpModel("per-slice", (("SLICE", "slice"),), ("result",)),
    OpModel("pair", (("SLICE", "slice"), ("OTHER", "other"))),
]


async def test_fan_out(store: EventStore, replicas: Any, scenes: Any) -> None:
    solvers = await replicas(1)
    await declare(store, FAN_OUT)
    scene = await scenes(FAN_OUT)
    uploads = [Unit("w", "whole"), Unit("o", "other")]
    await create_run(store, scene.run_id, uploads, max_parallel=3)
    await scene.history.wait_for(RunCompleted, checks=solvers)
    events = await quiesce(store, scene.run_id, solvers)
    check_history(events, 3)
    keys = scheduled_keys(events)
    assert sorted(op for op, _ in keys) == ["pair"] * 5 + ["per-slice"] * 5 + ["split"]
    assert set(keys) == solve(FAN_OUT, uploads).steps
    slices = {u for op, inputs in keys if op == "per-slice" for _, u in inputs}
    assert len(slices) == 5
    assert {dict(inputs)["SLICE"] for op, inputs in keys if op == "pair"} == slices
    assert {dict(inputs)["OTHER"] for op, inputs in keys if op == "pair"} == {"o"}


async def test_adapter_cycle_stops_after_two_steps(store: EventStore, replicas: Any, scenes: Any) -> None:
    ops = [OpModel("csv-to-hdf", (("IN", "csv"),), ("hdf",)), OpModel("hdf-to-csv", (("IN", "hdf"),), ("csv",))]
    solvers = await replicas(2)
    await declare(store, ops)
    scene = await scenes(ops)
    await create_run(store, scene.run_id, [Unit("u0", "csv")])
    await scene.history.wait_for(RunCompleted, checks=solvers)
    events = await quiesce(store, scene.run_id, solvers)
    check_history(events, 8)
    steps = [e.event for e in events if isinstance(e.event, StepScheduled)]
    assert [s.operator for s in steps] == ["csv-to-hdf", "hdf-to-csv"]
    assert [sorted(s.ancestors) for s in steps] == [["csv-to-hdf"], ["csv-to-hdf", "hdf-to-csv"]]
    first_key = step_key(steps[0].operator, [(i.env, i.unit_id) for i in steps[0].inputs])
    assert [i.unit_id for i in steps[1].inputs] == [output_unit_id(first_key, 0)]
    last_unit = [e.event for e in events if isinstance(e.event, DataUnitAdded)][-1]
    assert last_unit.data_kind == "csv" and sorted(last_unit.ancestors) == ["csv-to-hdf", "hdf-to-csv"]


async def test_zero_input_operator_runs_once_per_started_run(store: EventStore, replicas: Any, scenes: Any) -> None:
    ops = [OpModel("gen", (), ("seed",), fanout=2), OpModel("grow", (("IN", "seed"),))]
    solvers = await replicas(2)
    await declare(store, ops)
    first, second, idle = await scenes(ops), await scenes(ops), await scenes(ops)
    await create_run(store, first.run_id)
    await create_run(store, second.run_id)
    await create_run(store, idle.run_id, start=False)
    for scene in (first, second):
        await scene.history.wait_for(RunCompleted, checks=solvers)
    # starting again (and uploading to a never-started run) schedules nothing new
    await store.append(RunStarted(run_id=first.run_id), actor="test")
    await upload(store, idle.run_id, Unit("u0", "seed"))
    await first.history.wait_for(RunCompleted, 2, checks=solvers)
    for scene in (first, second):
        events = await quiesce(store, scene.run_id, solvers)
        check_history(events, 8)
        assert sorted(op for op, _ in scheduled_keys(events)) == ["gen", "grow", "grow"]
    events = await quiesce(store, idle.run_id, solvers)
    assert [type(e.event) for e in events] == [RunCreated, DataUnitAdded]


async def test_upload_after_completion_reopens_the_run(store: EventStore, replicas: Any, scenes: Any) -> None:
    ops = [OpModel("norm", (("IN", "raw"),), ("clean",)), OpModel("join", (("A", "clean"), ("B", "clean")))]
    solvers = await replicas(2)
    await declare(store, ops)
    scene = await scenes(ops)
    await create_run(store, scene.run_id, [Unit("u0", "raw")])
    done = await scene.history.wait_for(RunCompleted, checks=solvers)
    before = await quiesce(store, scene.run_id, solvers)
    assert sorted(op for op, _ in scheduled_keys(before)) == ["norm"]

    seq = await upload(store, scene.run_id, Unit("u1", "raw"))
    events, _ = await store.load_run(scene.run_id)
    assert RunState.from_events(scene.run_id, [e for e in events if e.seq <= seq]).status == "running"
    await scene.history.wait_for(RunCompleted, 2, checks=solvers)
    events = await quiesce(store, scene.run_id, solvers)
    check_history(events, 8)
    after = [k for k, e in zip(scheduled_keys(events), [e for e in events if isinstance(e.event, StepScheduled)])
             if e.seq > done.seq]
    # the new unit, then the pairs of the new clean unit with the old one; the old step not again
    assert sorted(op for op, _ in after) == ["join", "join", "norm"]
    assert set(scheduled_keys(events)) == solve(ops, [Unit("u0", "raw"), Unit("u1", "raw")]).steps
    assert len([e for e in events if isinstance(e.event, RunCompleted)]) == 2
    assert isinstance(events[-1].event, RunCompleted)
    assert RunState.from_events(scene.run_id, events).status == "complete"


async def test_new_unit_only_forms_new_sets(store: EventStore, replicas: Any, scenes: Any) -> None:
    ops = [OpModel("cmp", (("L", "item"), ("R", "item"))), OpModel("one", (("IN", "item"),)),
           OpModel("one-too", (("IN", "item"),))]
    solvers = await replicas(1)
    await declare(store, ops)
    scene = await scenes(ops)
    await create_run(store, scene.run_id, [Unit("u0", "item")])
    first = await scene.history.wait_for(RunCompleted, checks=solvers)
    # one unit: never paired with itself; the operator is part of the key (both run on u0)
    assert set(scheduled_keys(await quiesce(store, scene.run_id, solvers))) == {
        step_key("one", {"IN": "u0"}), step_key("one-too", {"IN": "u0"})}
    await upload(store, scene.run_id, Unit("u1", "item"))
    second = await scene.history.wait_for(RunCompleted, 2, checks=solvers)
    await upload(store, scene.run_id, Unit("u2", "item"))
    await scene.history.wait_for(RunCompleted, 3, checks=solvers)
    events = await quiesce(store, scene.run_id, solvers)
    check_history(events, 8)

    def between(lo: int, hi: int) -> set[StepKey]:
        return set(scheduled_keys([e for e in events if lo < e.seq < hi]))

    assert between(first.seq, second.seq) == {
        step_key("cmp", {"L": "u0", "R": "u1"}), step_key("cmp", {"L": "u1", "R": "u0"}),
        step_key("one", {"IN": "u1"}), step_key("one-too", {"IN": "u1"})}
    late = between(second.seq, 10**12)
    assert all("u2" in {u for _, u in inputs} for _, inputs in late), late
    assert len(late) == 6  # cmp (u0,u2) (u2,u0) (u1,u2) (u2,u1), one u2, one-too u2
    assert set(scheduled_keys(events)) == solve(ops, [Unit(f"u{i}", "item") for i in range(3)]).steps


async def test_runaway_guard(store: EventStore, replicas: Any, scenes: Any) -> None:
    ops = [OpModel("explode", (("IN", "seed"),), ("piece",), fanout=10), OpModel("chew", (("IN", "piece"),))]
    solvers = await replicas(1, max_steps_per_run=5)
    await declare(store, ops)
    scene = await scenes(ops)
    await create_run(store, scene.run_id, [Unit("u0", "seed")])
    requested = await scene.history.wait_for(RunTerminationRequested, checks=solvers)
    assert "max-steps" in requested.event.reason
    await scene.history.wait_for(RunTerminated, checks=solvers)
    events = await quiesce(store, scene.run_id, solvers)
    check_history(events, 8)
    assert 1 <= len(scheduled_keys(events)) <= 5
    assert not [e for e in events if isinstance(e.event, RunCompleted)]
    assert not [e for e in events if isinstance(e.event, StepScheduled) and e.seq > requested.seq]
    assert len([e for e in events if isinstance(e.event, RunTerminationRequested)]) == 1
    assert RunState.from_events(scene.run_id, events).status == "terminated"


async def test_termination_stops_scheduling(store: EventStore, replicas: Any, scenes: Any) -> None:
    ops = [OpModel("split", (("IN", "whole"),), ("slice",), fanout=4), OpModel("chew", (("IN", "slice"),))]
    solvers = await replicas(2)
    await declare(store, ops)
    scene = await scenes(ops, auto=False)
    await create_run(store, scene.run_id, [Unit("w", "whole")], max_parallel=1)
    [split] = await scene.executor.wait_scheduled(1)
    await scene.executor.finish(split)
    steps = await scene.executor.wait_scheduled(2)
    assert steps[1].operator == "chew"
    request = await store.append(RunTerminationRequested(run_id=scene.run_id), actor="test")
    # the running step finishes (Mlynar's behaviour); only then is the run terminated
    async def folded() -> bool:
        return all(r.folded(scene.run_id, request.seq) for r in solvers)

    await wait_until(folded, what="solvers to fold the termination request")
    assert not scene.history.of(RunTerminated)
    await scene.executor.finish(steps[1])
    terminated = await scene.history.wait_for(RunTerminated, checks=solvers)
    events = await quiesce(store, scene.run_id, solvers)
    check_history(events, 1)
    assert len(scheduled_keys(events)) == 2
    succeeded = [e for e in events if isinstance(e.event, StepSucceeded)]
    assert terminated.seq > succeeded[-1].seq
    assert not [e for e in events if isinstance(e.event, RunCompleted)]
    assert len([e for e in events if isinstance(e.event, RunTerminated)]) == 1
    # a unit arriving now doesn't reopen a terminated run
    await upload(store, scene.run_id, Unit("late", "slice"))
    events = await quiesce(store, scene.run_id, solvers)
    assert len(scheduled_keys(events)) == 2 and RunState.from_events(scene.run_id, events).status == "terminated"


async def test_solver_restart_mid_run(store: EventStore, replicas: Any, scenes: Any) -> None:
    ops = [OpModel("split", (("IN", "whole"),), ("slice",), fanout=6), OpModel("chew", (("IN", "slice"),), ("bit",)),
           OpModel("pair", (("A", "bit"), ("B", "whole")))]
    [first] = await replicas(1)
    await declare(store, ops)
    scene = await scenes(ops, auto=False)
    uploads = [Unit("w", "whole")]
    await create_run(store, scene.run_id, uploads, max_parallel=2)
    [split] = await scene.executor.wait_scheduled(1)
    await scene.executor.finish(split)
    await scene.executor.wait_scheduled(3)
    await first.stop()  # mid-run: two steps running, four input sets held back
    [second] = await replicas(1)
    await scene.executor.release()
    await scene.history.wait_for(RunCompleted, checks=[second])
    events = await quiesce(store, scene.run_id, [second])
    check_history(events, 2)
    assert set(scheduled_keys(events)) == solve(ops, uploads).steps
    assert len([e for e in events if isinstance(e.event, RunCompleted)]) == 1


async def test_failover_between_replicas_while_running(store: EventStore, replicas: Any, scenes: Any) -> None:
    """Replicas come and go during a run: it completes, nothing is scheduled twice."""
    ops = FAN_OUT + [OpModel("fold", (("IN", "result"),), ("result2",))]
    a, b = await replicas(2)
    await declare(store, ops)
    scene = await scenes(ops, seed=7, redeliver=0.5)
    uploads = [Unit("w", "whole"), Unit("o", "other"), Unit("o2", "other")]
    await create_run(store, scene.run_id, uploads, max_parallel=2)
    await scene.executor.wait_scheduled(4)
    await a.stop()
    await scene.executor.wait_scheduled(8)
    [c] = await replicas(1)
    await b.stop()
    await scene.history.wait_for(RunCompleted, checks=[c])
    events = await quiesce(store, scene.run_id, [c])
    check_history(events, 2)
    assert set(scheduled_keys(events)) == solve(ops, uploads).steps
    assert len([e for e in events if isinstance(e.event, RunCompleted)]) == 1


async def test_restart_when_the_stream_ends_with_another_aggregate(store: EventStore, replicas: Any,
                                                                   scenes: Any) -> None:
    """A solver starting on a history whose last event isn't one it follows (here a machine
    registration) still decides the runs waiting for it."""
    ops = [OpModel("chew", (("IN", "food"),))]
    await declare(store, ops)
    scene = await scenes(ops)
    await create_run(store, scene.run_id, [Unit("u0", "food")])  # no solver running yet
    await store.append(MachineRegistered(name="m", url="http://127.0.0.1:1"), actor="test")
    solvers = await replicas(1)
    await scene.history.wait_for(RunCompleted, checks=solvers, timeout=10)
    events = await quiesce(store, scene.run_id, solvers)
    assert set(scheduled_keys(events)) == {step_key("chew", {"IN": "u0"})}


async def test_failed_step_does_not_stop_the_run(store: EventStore, replicas: Any, scenes: Any) -> None:
    ops = [OpModel("flaky", (("IN", "a"),), ("b",), fail=True), OpModel("fine", (("IN", "a"),), ("b",)),
           OpModel("after", (("IN", "b"),))]
    solvers = await replicas(1)
    await declare(store, ops)
    scene = await scenes(ops)
    await create_run(store, scene.run_id, [Unit("u0", "a")])
    await scene.history.wait_for(RunCompleted, checks=solvers)
    events = await quiesce(store, scene.run_id, solvers)
    check_history(events, 8)
    assert sorted(op for op, _ in scheduled_keys(events)) == ["after", "fine", "flaky"]
    state = RunState.from_events(scene.run_id, events)
    assert sorted(s.status for s in state.steps.values()) == ["failure", "success", "success"]
