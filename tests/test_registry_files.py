"""``--registry`` on folders as users have them: foreign YAML is skipped with a note, a bad file
or an undeclared kind stops the start with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlynar_events.serve import ConfigError
from mlynar_events.specs import SpecError, load_documents
from support import EXAMPLES

HELM_VALUES = "# couchdb-values.yml of the original's examples\ncouchdbConfig:\n  couchdb:\n    uuid: abc\nclusterSize: 1\n"
DEPLOYMENT = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec: {}\n"
OPERATOR = """apiVersion: mlynar.dev/v1alpha1
kind: Operator
metadata:
  name: orphan
spec:
  image: busybox
  inputs:
    - fileLocationEnv: IN
      dataKind: never-declared
  possibleOutputKinds: [also-never-declared]
"""


def test_foreign_documents_are_skipped_with_a_note(tmp_path: Path) -> None:
    folder = tmp_path / "examples"
    folder.mkdir()
    (folder / "registry.yaml").write_text((EXAMPLES / "datakinds.yaml").read_text())
    (folder / "couchdb-values.yml").write_text(HELM_VALUES)
    (folder / "web.yaml").write_text(DEPLOYMENT + "---\n" + DEPLOYMENT.replace("web", "api"))
    skipped: list[str] = []
    docs = load_documents([folder], skipped)
    assert docs and {d.kind for d in docs} == {"DataKind"}
    assert len(skipped) == 3
    assert any("couchdb-values.yml (document 1): skipped, not a Kubernetes document" in s for s in skipped)
    assert sum("skipped, Deployment apps/v1" in s for s in skipped) == 2


def test_a_file_that_is_not_yaml_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: not readable as YAML"):
        load_documents([tmp_path])
    (tmp_path / "broken.yaml").write_text("apiVersion: mlynar.dev/v9\nkind: DataKind\nmetadata: {name: x}\nspec: {}\n")
    with pytest.raises(SpecError, match="broken.yaml: apiVersion must be"):
        load_documents([tmp_path])


async def test_an_operator_of_undeclared_kinds_stops_the_start_clearly(make_service, tmp_path: Path) -> None:
    (tmp_path / "op.yaml").write_text(OPERATOR)
    with pytest.raises(ConfigError, match="--registry: Operator orphan: operator 'orphan' uses undeclared data kinds"):
        await make_service(registry=[tmp_path / "op.yaml"])


def test_the_command_says_it_in_one_line_and_exits_2(tmp_path: Path, nats_url: str) -> None:
    (tmp_path / "op.yaml").write_text(OPERATOR)
    proc = subprocess.run(
        [sys.executable, "-m", "mlynar_events.cli", "serve", "--data-dir", str(tmp_path / "data"), "--nats-url", nats_url,
         "--port", "0", "--no-local-machine", "--registry", str(tmp_path / "op.yaml")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--registry: Operator orphan: operator 'orphan' uses undeclared data kinds" in proc.stderr
