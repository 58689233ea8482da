"""Lineage and provenance of a run, from its fold (:class:`mlynar_events.runstate.RunState`).

The graph is the run's data flow: data units and steps are nodes, an edge goes from each input
unit to the step that took it and from a step to each unit it produced. Provenance follows one
unit back to the uploads it came from, with every step on the way: its operator, the revision
of the operator that ran and the parameter values it ran with (``StepScheduled`` records them,
so this is what ran, not what the registry says today).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from .runstate import RunState


class UnitNode(BaseModel):
    id: str
    type: Literal["unit"] = "unit"
    dataKind: str
    filename: str
    stepId: str | None


class StepNode(BaseModel):
    id: str
    type: Literal["step"] = "step"
    operator: str
    revision: int
    status: str


class Edge(BaseModel):
    source: str
    target: str
    env: str | None = None
    """For unit → step edges: the environment variable the unit was given as."""


class Lineage(BaseModel):
    runId: str
    nodes: list[UnitNode | StepNode]
    edges: list[Edge]


class ProducedBy(BaseModel):
    step: str
    operator: str
    revision: int
    parameters: dict[str, str]
    inputs: list["Provenance"]


class Provenance(BaseModel):
    unit: str
    dataKind: str
    filename: str
    producedBy: ProducedBy | None
    """None for an upload: where the chain starts."""


def lineage(state: RunState) -> Lineage:
    nodes: list[UnitNode | StepNode] = [
        UnitNode(id=u.unit_id, dataKind=u.data_kind, filename=u.filename, stepId=u.step_id)
        for u in state.units.values()]
    edges: list[Edge] = []
    for step_id, step in state.steps.items():
        s = step.scheduled
        nodes.append(StepNode(id=step_id, operator=s.operator, revision=s.revision, status=step.status))
        edges += [Edge(source=i.unit_id, target=step_id, env=i.env) for i in s.inputs]
    edges += [Edge(source=u.step_id, target=u.unit_id) for u in state.units.values() if u.step_id]
    return Lineage(runId=state.run_id, nodes=nodes, edges=edges)


def provenance(state: RunState, unit_id: str) -> Provenance | None:
    """The chain from ``unit_id`` back to its uploads; None if the run has no such unit."""
    unit = state.units.get(unit_id)
    if unit is None:
        return None
    produced = None
    step = state.steps.get(unit.step_id) if unit.step_id else None
    if step is not None:
        s = step.scheduled
        names = {c.name for c in s.spec.configurableEnv}
        produced = ProducedBy(
            step=unit.step_id or "", operator=s.operator, revision=s.revision,
            parameters={k: v for k, v in s.env.items() if k in names},
            inputs=[p for i in s.inputs if (p := provenance(state, i.unit_id)) is not None])
    return Provenance(unit=unit_id, dataKind=unit.data_kind, filename=unit.filename, producedBy=produced)
