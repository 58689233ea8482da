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
import stat
import sys
import tempfile
from pathlib import Path, PurePosixPath

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


class UnsafeFile(Exception):
    """A file the agent will not serve; the message says why, for the user."""


def open_regular(root: Path, rel: str) -> int:
    """A read-only descriptor of ``root/rel``, walked one component at a time without following
    any symlink, and only if it is a regular file with a single link.

    Why: an output (or the logs) must be a file the step created inside its sandbox. A symlink,
    even one pointing inside, is refused; a hard link (``st_nlink > 1``) may be a second name of a
    file outside the sandbox (``ln /etc/shadow out/x``), so it is refused as well. Reading
    through the returned descriptor serves exactly the file that was checked."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in ("..", ".") for p in parts):
        raise UnsafeFile(f"{rel!r} is not a plain relative path")
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | flags)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, (os.O_RDONLY | os.O_NONBLOCK if last else os.O_RDONLY | os.O_DIRECTORY) | flags,
                              dir_fd=fd)
            except OSError as e:
                st = _lstat_at(part, fd)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise UnsafeFile(f"{rel!r} is (or goes through) a symlink") from None
                raise UnsafeFile(f"{rel!r} cannot be opened: {e.strerror or e}") from None
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{rel!r} is not a regular file")
        if st.st_nlink != 1:
            raise UnsafeFile(f"{rel!r} is a hard link (link count {st.st_nlink}): it may be a file from outside "
                             "the sandbox; write a new file instead")
        out, fd = fd, -1
        return out
    finally:
        if fd >= 0:
            os.close(fd)


def _lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


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
