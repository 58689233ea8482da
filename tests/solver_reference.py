"""A brute-force model of Mlynar's turn loop (docs/ARCHITECTURE.md, "Mlynar semantics"), the oracle for the solver tests.

Every turn, for every operator, the candidates of each input are the pool's units of that input's
kind whose ancestors don't contain the operator; every input set is one candidate per input (the
cartesian product), never the same unit twice; each (operator, input map) runs once; an operator
with no inputs runs once. Each new step is "run" at once: its outputs are a deterministic function
of (operator, input map) given by :class:`OpModel`; an output's ancestors are the union of its
inputs' ancestors plus the operator. Turns repeat until no new step appears.

Unit ids are content-derived (uploaded units are named by the test, outputs are
:func:`output_unit_id` of the step's canonical key and the output index), so the model's ids and
the ids a test executor gives the real solver's outputs are the same strings: results compare
directly, with no mapping from generated ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

# (operator, frozenset({(fileLocationEnv, unit_id), ...})): what "the same input set" means
StepKey = tuple[str, frozenset[tuple[str, str]]]


def step_key(operator: str, inputs: dict[str, str] | list[tuple[str, str]]) -> StepKey:
    items = inputs.items() if isinstance(inputs, dict) else inputs
    return operator, frozenset(items)


def _digest(*parts: object) -> int:
    raw = json.dumps(parts, sort_keys=True, default=sorted, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(raw.encode()).digest()[:8], "big")


def key_hash(key: StepKey) -> int:
    operator, inputs = key
    return _digest(operator, sorted(inputs))


def output_unit_id(key: StepKey, index: int) -> str:
    return f"o{key_hash(key) ^ _digest(index):016x}"


@dataclass(frozen=True)
class OpModel:
    """An operator as the tests declare it and as the test executor runs it.

    ``inputs`` are (fileLocationEnv, kind) in spec order. A step produces ``fanout`` outputs, or,
    with ``hashed``, ``hash(step) % (fanout + 1)`` of them (the number of outputs depends on the
    input); output ``i`` has kind ``outputs[(i + hash) % len(outputs)]``. No ``outputs`` = an
    operator that can never produce anything. ``fail``: every step of it fails (no outputs)."""

    name: str
    inputs: tuple[tuple[str, str], ...] = ()
    outputs: tuple[str, ...] = ()
    fanout: int = 1
    hashed: bool = False
    fail: bool = False

    def results(self, key: StepKey) -> list[tuple[str, str]]:
        """[(unit_id, kind)] of the outputs of the step ``key`` (empty when it fails)."""
        if self.fail or not self.outputs:
            return []
        h = key_hash(key)
        n = h % (self.fanout + 1) if self.hashed else self.fanout
        return [(output_unit_id(key, i), self.outputs[(i + h) % len(self.outputs)]) for i in range(n)]

    def spec(self, machine: str = "m") -> dict:
        return {
            "machine": machine,
            "command": ["x"],
            "inputs": [{"fileLocationEnv": env, "dataKind": kind} for env, kind in self.inputs],
            "possibleOutputKinds": sorted(set(self.outputs)),
        }


@dataclass(frozen=True)
class Unit:
    unit_id: str
    kind: str
    ancestors: frozenset[str] = frozenset()


@dataclass
class Outcome:
    steps: set[StepKey] = field(default_factory=set)
    units: dict[str, Unit] = field(default_factory=dict)
    # ancestors each step's outputs get: union of the inputs' ancestors plus the operator
    step_ancestors: dict[StepKey, frozenset[str]] = field(default_factory=dict)


class TooManySteps(Exception):
    pass


def solve(operators: list[OpModel], uploads: list[Unit], *, limit: int | None = None) -> Outcome:
    """The fixpoint of the turn loop. ``limit``: give up (TooManySteps) beyond that many steps."""
    out = Outcome(units={u.unit_id: u for u in uploads})
    while True:
        new: list[tuple[OpModel, StepKey, tuple[Unit, ...]]] = []
        pool = list(out.units.values())
        for op in operators:
            candidates = [
                [u for u in pool if u.kind == kind and op.name not in u.ancestors] for _, kind in op.inputs
            ]
            for combo in itertools.product(*candidates):
                if len({u.unit_id for u in combo}) != len(combo):
                    continue
                key = step_key(op.name, [(env, u.unit_id) for (env, _), u in zip(op.inputs, combo)])
                if key not in out.steps:
                    out.steps.add(key)
                    new.append((op, key, combo))
        if not new:
            return out
        if limit is not None and len(out.steps) > limit:
            raise TooManySteps(len(out.steps))
        for op, key, combo in new:
            ancestors = frozenset().union(*(u.ancestors for u in combo)) | {op.name}
            out.step_ancestors[key] = ancestors
            for unit_id, kind in op.results(key):
                out.units[unit_id] = Unit(unit_id, kind, ancestors)
