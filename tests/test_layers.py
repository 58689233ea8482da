"""The layering of docs/ARCHITECTURE.md, checked on every import statement of the code
(module-level and inside functions): roles meet only on the stream, and the core imports no role
outside its wiring (``serve.py``) and CLI (``cli.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mlynar_events", "api", "projections", "executors")

# package -> the packages of ours it may import (besides itself)
MAY_IMPORT: dict[str, set[str]] = {
    "mlynar_events": set(),
    "api": {"mlynar_events", "projections"},
    "projections": {"mlynar_events"},
    "executors": {"mlynar_events"},
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


@pytest.mark.parametrize("source,expected", [
    ("import executors.worker\n", {"executors"}),
    ("def f():\n    from api.app import create_app\n", {"api"}),
    ("from .sibling import x\nimport json\n", set()),
    ("from projections import queries\n", {"projections"}),
])
def test_the_check_sees_every_kind_of_import(source: str, expected: set[str]) -> None:
    assert imported_packages(source) == expected
