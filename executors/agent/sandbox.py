"""On-disk layout of the agent's work directory.

::

    <work-dir>/agent.lock                 flock held while an agent uses this directory
    <work-dir>/tmp/<random>/              a step being uploaded (renamed into steps/ when complete)
    <work-dir>/steps/<step_id>/           the step's sandbox, also its $HOME
        manifest.json                     the accepted manifest (compared by an idempotent PUT)
        state.json                        the step status, written atomically
        inputs/<name>/<filename>          the uploaded input files
        work/                             the step's working directory
        out/                              $MLYNAR_OUTPUT_DIR
        logs.txt                          stdout and stderr of the step, merged
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .models import StepManifest, StepStatus

OUTPUT_MANIFEST = "mlynar-out.json"


class StepDir:
    """Paths of one step's sandbox."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def logs(self) -> Path:
        return self.root / "logs.txt"

    def input_file(self, name: str, filename: str) -> Path:
        return self.inputs / name / filename

    def create_layout(self) -> None:
        for d in (self.inputs, self.work, self.out):
            d.mkdir(parents=True, exist_ok=True)
        self.logs.touch()

    def write_manifest(self, manifest: StepManifest) -> None:
        atomic_write_json(self.manifest_file, manifest.canonical())

    def read_manifest(self) -> StepManifest:
        return StepManifest.model_validate(json.loads(self.manifest_file.read_text(encoding="utf-8")))

    def write_state(self, status: StepStatus) -> None:
        atomic_write_json(self.state_file, status.public())

    def read_state(self) -> StepStatus:
        return StepStatus.model_validate(json.loads(self.state_file.read_text(encoding="utf-8")))


def atomic_write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` so a reader (or a crash) never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_tree(path: Path) -> None:
    """Remove a directory tree, also when the step left read-only directories behind."""

    def onerror(func, p, _exc):  # noqa: ANN001
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        try:
            func(p)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(p, ignore_errors=True)

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=onerror)
        else:
            shutil.rmtree(path, onerror=onerror)
