"""The layering of docs/ARCHITECTURE.md, checked on every import statement of the code
(module-level and inside functions): roles meet only on the stream, and the core imports no role
outside its wiring (``serve.py``) and CLI (``cli.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mlynar_events", "api", "projections", "executors", "integrations", "client")

# package -> the packages of ours it may import (besides itself)
MAY_IMPORT: dict[str, set[str]] = {
    "mlynar_events": set(),
    "api": {"mlynar_events", "projections"},
    "projections": {"mlynar_events"},
    "executors": {"mlynar_events"},
    "integrations": {"mlynar_events"},
    "client": {"mlynar_events"},  # and only its pure parts: CLIENT_MAY_USE
}
# the one place that starts the roles side by side, and the command line
WIRING = {"mlynar_events/serve.py", "mlynar_events/cli.py"}


def imported_packages(source: str) -> set[str]:
    """Our top-level packages a module's source imports anywhere (relative imports stay inside
    the module's own package and are not counted)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def violations() -> list[str]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in WIRING:
                continue
            bad = imported_packages(path.read_text()) - MAY_IMPORT[package] - {package}
            out.extend(f"{rel} imports {b}" for b in sorted(bad))
    return out


def test_no_module_crosses_a_layer() -> None:
    assert violations() == []


# the client talks to the service over HTTP only; of the core it uses what is pure
CLIENT_MAY_USE = {"mlynar_events.config", "mlynar_events.specs"}


def core_modules_used(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mlynar_events")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mlynar_events":
                found.update(f"mlynar_events.{a.name}" for a in node.names)
            elif node.module.startswith("mlynar_events."):
                found.add(node.module)
    return found


def test_the_client_uses_only_pure_parts_of_the_core() -> None:
    beyond = {p.relative_to(ROOT).as_posix(): sorted(core_modules_used(p.read_text()) - CLIENT_MAY_USE)
              for p in sorted((ROOT / "client").rglob("*.py"))}
    assert {module: bad for module, bad in beyond.items() if bad} == {}


@pytest.mark.parametrize("source,expected", [
    ("import executors.worker\n", {"executors"}),
    ("def f():\n    from api.app import create_app\n", {"api"}),
    ("from .sibling import x\nimport json\n", set()),
    ("from projections import queries\n", {"projections"}),
])
def test_the_check_sees_every_kind_of_import(source: str, expected: set[str]) -> None:
    assert imported_packages(source) == expected
