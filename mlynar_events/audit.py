"""Re-deriving what the service decided, from the stream alone: is every scheduling decision
justified, is none missing, did nothing run twice?

This is an independent reading of the Mlynar semantics (docs/ARCHITECTURE.md), written without
the solver's code, so that a bug in the solver shows up here instead of being repeated:

* every ``StepScheduled`` is justified by the pool at that point: the run was started, the
  operator was declared at that revision, each input unit was already in the pool, has the
  kind of its slot, does not have the operator among its ancestors, and no unit fills two slots;
* no step twice: no two steps of a run with the same operator and input map, no step with two
  outcomes, and every unit a step produced is one its success reported (a unit from an attempt
  that did not succeed would feed the rest of the run a second time);
* nothing missing: in a run that completed (not terminated), every input set that was possible
  when its last unit arrived (or when the run started, if later), with the operator declared
  then, was scheduled.

The projection side of the audit (the live views against a replay) is in
:mod:`projections.audit`; ``mlynar audit verify`` runs both.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from .events import (
    DataUnitAdded, OperatorDeclared, OperatorDeleted, RunCompleted, RunStarted, RunTerminated,
    StepCancelled, StepFailed, StepScheduled, StepSucceeded, StoredEvent,
)
from .specs import OperatorSpec


@dataclass(frozen=True)
class Finding:
    """One discrepancy, precise enough to find it: which run, which event, what is wrong."""

    message: str
    run_id: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = " ".join(p for p in (f"run {self.run_id}" if self.run_id else "",
                                     f"seq {self.seq}" if self.seq else "") if p)
        return f"{where}: {self.message}" if where else self.message


@dataclass
class _Operators:
    """Every operator's declarations over time, to ask what was declared at a sequence."""

    history: dict[str, list[tuple[int, OperatorSpec | None, int]]] = field(default_factory=dict)

    def apply(self, e: OperatorDeclared | OperatorDeleted, seq: int) -> None:
        spec = e.spec if isinstance(e, OperatorDeclared) else None
        revision = e.revision if isinstance(e, OperatorDeclared) else 0
        self.history.setdefault(e.name, []).append((seq, spec, revision))

    def at(self, name: str, seq: int) -> tuple[OperatorSpec, int] | None:
        entries = self.history.get(name, [])
        i = bisect.bisect_right([s for s, _, _ in entries], seq) - 1
        if i < 0 or entries[i][1] is None:
            return None
        return entries[i][1], entries[i][2]  # type: ignore[return-value]


@dataclass
class _Run:
    run_id: str
    started_seq: int | None = None
    units: dict[str, tuple[int, DataUnitAdded]] = field(default_factory=dict)
    steps: dict[str, StepScheduled] = field(default_factory=dict)
    input_maps: dict[tuple[str, tuple[tuple[str, str], ...]], str] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    succeeded_outputs: dict[str, set[str]] = field(default_factory=dict)
    completed_seq: int | None = None
    terminated: bool = False


def _input_map(inputs: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(inputs))


def check_scheduling(events: list[StoredEvent]) -> tuple[list[Finding], int]:
    """The findings over the whole stream (in order), and how many runs were checked."""
    ops = _Operators()
    runs: dict[str, _Run] = {}
    findings: list[Finding] = []
    for stored in events:
        e, seq = stored.event, stored.seq
        if isinstance(e, (OperatorDeclared, OperatorDeleted)):
            ops.apply(e, seq)
            continue
        run_id = getattr(e, "run_id", None)
        if run_id is None:
            continue
        run = runs.setdefault(run_id, _Run(run_id))
        match e:
            case RunStarted():
                run.started_seq = run.started_seq or seq
            case DataUnitAdded():
                run.units.setdefault(e.unit_id, (seq, e))
            case StepScheduled():
                findings += _check_step(run, e, seq, ops)
            case StepSucceeded() | StepFailed() | StepCancelled():
                run.outcomes[e.step_id] = run.outcomes.get(e.step_id, 0) + 1
                if run.outcomes[e.step_id] == 2:
                    findings.append(Finding(f"step {e.step_id} has a second outcome ({e.event_type})", run_id, seq))
                if isinstance(e, StepSucceeded):
                    run.succeeded_outputs.setdefault(e.step_id, set()).update(e.outputs)
            case RunCompleted():
                run.completed_seq = run.completed_seq or seq
            case RunTerminated():
                run.terminated = True
    for run in runs.values():
        findings += _check_outputs(run)
        if run.completed_seq is not None and not run.terminated:
            findings += _check_nothing_missing(run, ops)
    return findings, len(runs)


def _check_step(run: _Run, e: StepScheduled, seq: int, ops: _Operators) -> list[Finding]:
    out: list[Finding] = []

    def bad(message: str) -> None:
        out.append(Finding(f"step {e.step_id} ({e.operator}): {message}", run.run_id, seq))

    if e.step_id in run.steps:
        bad("scheduled twice (same step id)")
        return out
    run.steps[e.step_id] = e
    if run.started_seq is None:
        bad("scheduled before the run was started")
    declared = ops.at(e.operator, seq)
    if declared is None:
        bad("the operator was not declared at that point")
        return out
    spec, revision = declared
    if revision != e.revision:
        bad(f"scheduled at revision {e.revision}, but revision {revision} was declared then")
    slots = {i.fileLocationEnv: i.dataKind for i in spec.inputs}
    given = {i.env: i.unit_id for i in e.inputs}
    if set(given) != set(slots):
        bad(f"input slots {sorted(given)} are not the operator's {sorted(slots)}")
    if len(set(given.values())) != len(given):
        bad("one unit fills two input slots")
    for env, unit_id in given.items():
        found = run.units.get(unit_id)
        if found is None:
            bad(f"input {env} is unit {unit_id}, which was not in the pool yet")
            continue
        unit = found[1]
        if env in slots and unit.data_kind != slots[env]:
            bad(f"input {env} wants {slots[env]} but unit {unit_id} is {unit.data_kind}")
        if e.operator in unit.ancestors:
            bad(f"input unit {unit_id} already descends from {e.operator}")
    key = (e.operator, _input_map(list(given.items())))
    if key in run.input_maps:
        bad(f"the same input set was already scheduled as step {run.input_maps[key]}")
    else:
        run.input_maps[key] = e.step_id
    return out


def _check_outputs(run: _Run) -> list[Finding]:
    out = []
    for seq, unit in run.units.values():
        if unit.step_id is None:
            continue
        step = run.steps.get(unit.step_id)
        if step is None:
            out.append(Finding(f"unit {unit.unit_id} names step {unit.step_id}, which was never scheduled", run.run_id, seq))
        elif unit.unit_id not in run.succeeded_outputs.get(unit.step_id, set()):
            out.append(Finding(f"unit {unit.unit_id} of step {unit.step_id} is not among the outputs of its "
                               "success: an attempt's outputs entered the pool twice or without a success",
                               run.run_id, seq))
        elif unit.data_kind not in step.spec.possibleOutputKinds:
            out.append(Finding(f"unit {unit.unit_id} has kind {unit.data_kind}, not one step {unit.step_id}'s "
                               "operator may produce", run.run_id, seq))
    return out


def _check_nothing_missing(run: _Run, ops: _Operators) -> list[Finding]:
    """Every input set possible when its last unit arrived (the run started by then) was
    scheduled. Only units that arrived before the run completed count."""
    completed = run.completed_seq or 0
    units = [(seq, u) for seq, u in run.units.values() if seq < completed]
    out = []
    for name in ops.history:
        by_kind: dict[str, list[tuple[int, DataUnitAdded]]] = {}
        for seq, u in units:
            if name not in u.ancestors:
                by_kind.setdefault(u.data_kind, []).append((seq, u))
        latest = ops.at(name, completed)
        if latest is None or not latest[0].inputs:
            continue
        slots = [(i.fileLocationEnv, i.dataKind) for i in latest[0].inputs]
        for combo in itertools.product(*(by_kind.get(kind, []) for _, kind in slots)):
            ids = [u.unit_id for _, u in combo]
            if len(set(ids)) != len(ids):
                continue
            trigger = max([s for s, _ in combo] + [run.started_seq or 0])
            declared = ops.at(name, trigger)
            if declared is None or [(i.fileLocationEnv, i.dataKind) for i in declared[0].inputs] != slots:
                continue  # not possible when the data landed: the solver had nothing to react to
            key = (name, _input_map([(env, uid) for (env, _), uid in zip(slots, ids)]))
            if key not in run.input_maps:
                out.append(Finding(f"operator {name} was never scheduled for the input set "
                                   f"{dict(key[1])}, possible since seq {trigger}", run.run_id, completed))
    return out
