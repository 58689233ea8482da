"""The event catalogue is the classes: stable type names, upcasting on the class, roles that
declare what they consume (and whose handlers name nothing else), and the catalogue in
docs/ARCHITECTURE.md kept equal to the code."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mlynar_events import events
from mlynar_events.events import CATALOGUE, Envelope, RunEvent, subject_filters

ROOT = Path(__file__).resolve().parent.parent

# (module, class) of every role or fold that reads the stream
ROLES = [
    ("mlynar_events.solver", "Solver"),
    ("mlynar_events.registry", "Registry"),
    ("projections.projector", "Projector"),
    ("executors.worker", "StepWorker"),
    ("executors.machine", "MachineDirectory"),
    ("executors.kubernetes.crd_sync", "CrdSync"),
    ("integrations.webhooks", "WebhookDispatcher"),
]


@pytest.fixture
def scratch_catalogue():
    """Classes a test defines are taken out of the catalogue afterwards."""
    before = dict(CATALOGUE)
    yield
    CATALOGUE.clear()
    CATALOGUE.update(before)


def test_every_concrete_event_is_in_the_catalogue_under_its_stable_name() -> None:
    def concrete(cls: type) -> list[type]:
        out = []
        for sub in cls.__subclasses__():
            if "event_type" in sub.__dict__:
                out.append(sub)
            out.extend(concrete(sub))
        return out

    classes = {c for c in concrete(events.Event) if c.__module__ == "mlynar_events.events"}
    assert classes == set(CATALOGUE.values())
    for name, cls in CATALOGUE.items():
        assert cls.event_type == name


def test_a_class_without_event_type_or_with_a_taken_one_fails_at_definition(scratch_catalogue: None) -> None:
    with pytest.raises(TypeError, match="must set event_type"):
        class Forgotten(RunEvent):  # noqa: F841
            pass
    with pytest.raises(TypeError, match="already"):
        class Impostor(RunEvent):  # noqa: F841
            event_type: ClassVar[str] = "RunCreated"


def test_subject_uses_the_stored_name_not_the_python_name(scratch_catalogue: None) -> None:
    class RenamedInCode(RunEvent):
        event_type: ClassVar[str] = "TestOldName"

    event = RenamedInCode(run_id="r1")
    assert event.subject() == "mlynar.run.r1.TestOldName"
    env = Envelope.wrap(event, actor="t")
    assert env.type == "TestOldName"
    assert Envelope.model_validate_json(env.to_bytes()).event() == event


def test_an_old_schema_event_is_upcast_on_read(scratch_catalogue: None) -> None:
    class TestWidgetResized(RunEvent):
        event_type: ClassVar[str] = "TestWidgetResized"
        schema_version: ClassVar[int] = 3
        width_mm: int
        unit: str

        @staticmethod
        def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:  # v1 had centimetres in "width"
            data = dict(data)
            data["width_mm"] = data.pop("width") * 10
            return data

        @staticmethod
        def upcast_v2_v3(data: dict[str, Any]) -> dict[str, Any]:  # v3 names the unit
            return {**data, "unit": "mm"}

    stored_v1 = ('{"id": "e1", "type": "TestWidgetResized", "schema": 1, "time": "2026-01-01T00:00:00Z",'
                 ' "actor": "old", "data": {"run_id": "r", "width": 7}}')
    assert Envelope.model_validate_json(stored_v1).event() == TestWidgetResized(run_id="r", width_mm=70, unit="mm")
    current = Envelope.wrap(TestWidgetResized(run_id="r", width_mm=5, unit="mm"), actor="t")
    assert current.schema_ == 3
    assert Envelope.model_validate_json(current.to_bytes()).event().width_mm == 5  # type: ignore[attr-defined]


def test_a_schema_bump_without_its_upcaster_fails_at_definition(scratch_catalogue: None) -> None:
    with pytest.raises(TypeError, match="upcast_v1_v2"):
        class TestBumped(RunEvent):  # noqa: F841
            event_type: ClassVar[str] = "TestBumped"
            schema_version: ClassVar[int] = 2


def test_subject_filters() -> None:
    assert subject_filters([events.StepScheduled]) == ["mlynar.run.*.StepScheduled"]
    assert subject_filters(events.of_aggregate("machine")) == ["mlynar.machine.>"]
    assert subject_filters(CATALOGUE.values()) == ["mlynar.>"]
    assert subject_filters([events.RunDeleted, events.DataKindDeleted, events.RunCreated]) == [
        "mlynar.datakind.*.DataKindDeleted", "mlynar.run.*.RunCreated", "mlynar.run.*.RunDeleted"]


def _named_events(source: str) -> set[str]:
    """Event classes a module's code reacts to: ``case X()``, ``isinstance(e, X)`` and
    ``@handles(X)``."""
    tree = ast.parse(source)
    names: set[str] = set()

    def add(node: ast.AST) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in CATALOGUE:
                names.add(n.id)

    for node in ast.walk(tree):
        if isinstance(node, ast.MatchClass):
            add(node.cls)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "isinstance" and len(node.args) == 2:
                add(node.args[1])
            elif node.func.id == "handles":
                for arg in node.args:
                    add(arg)
    return names


@pytest.mark.parametrize("module_name,role", ROLES)
def test_roles_react_only_to_what_they_declare(module_name: str, role: str) -> None:
    module = importlib.import_module(module_name)
    consumes = getattr(module, role).CONSUMES
    assert consumes and all(c in CATALOGUE.values() for c in consumes)
    # READS: events a role looks up on demand without following them (e.g. a run's RunCreated)
    declared = {c.__name__ for c in (*consumes, *getattr(getattr(module, role), "READS", ()))}
    undeclared = _named_events(inspect.getsource(module)) - declared
    assert not undeclared, f"{role} reacts to {sorted(undeclared)} but does not declare it in CONSUMES"


def test_the_check_above_catches_an_undeclared_handler() -> None:
    source = ("def f(e):\n    match e:\n        case StepFailed():\n            pass\n"
              "    return isinstance(e, (RunDeleted, int))\n")
    assert _named_events(source) == {"StepFailed", "RunDeleted"}


def test_architecture_doc_lists_exactly_the_catalogue() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## Event catalogue", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert listed == set(CATALOGUE), (sorted(set(CATALOGUE) - listed), sorted(listed - set(CATALOGUE)))
