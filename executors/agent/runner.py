"""Runs steps: one sandbox, one process group per step, persisted state, result expiry.

The :class:`StepManager` owns every step the agent knows. Each accepted step gets an asyncio task
(:meth:`StepManager._run`) that waits for a ``--max-parallel`` slot, starts the command in its own
session/process group with an environment built from scratch, enforces the timeout, kills whatever
the step left behind in its group, then validates ``mlynar-out.json`` and hashes the outputs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import fnmatch
import hashlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from mlynar_events.outputs import OutputManifestError, read_output_manifest

from .models import (
    TERMINAL_STATES,
    StepManifest,
    StepOutput,
    StepStatus,
    valid_step_id,
)
from .sandbox import StepDir, remove_tree
from .settings import AgentConfigError, AgentSettings

log = logging.getLogger("mlynar.agent")

HASH_CHUNK = 1024**2
RESTARTED_ERROR = "agent restarted while the step was running"


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --- PR_SET_PDEATHSIG -------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_prctl = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _prctl = _libc.prctl
        _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _prctl.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _prctl = None


def _make_preexec(parent_pid: int):
    """Runs in the child between fork and exec: ask the kernel to SIGKILL the child when the agent
    dies (Linux only). The child's own children do not inherit this; the agent kills the whole
    process group on timeout, cancel and stop instead."""
    if _prctl is None:
        return None
    prctl = _prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the agent died before prctl took effect
            os._exit(137)

    return preexec


def _killpg(pgid: int | None, sig: int) -> bool:
    """Signal a process group; False when it no longer exists."""
    if pgid is None or pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("no permission to signal process group %d", pgid)
        return False


# --- output validation ------------------------------------------------------------------------


class StepFailure(Exception):
    """The step's outputs are unacceptable; the message becomes the step's error."""


def collect_outputs(out_dir: Path) -> list[StepOutput]:
    """Check ``mlynar-out.json`` in ``out_dir`` (:func:`mlynar_events.outputs.read_output_manifest`)
    and describe every output file (size, sha256).

    ``out_dir`` must itself still be the real directory the agent created (a step cannot swap it
    for a symlink)."""
    out_real = _real_out_dir(out_dir)
    if out_real is None:
        raise StepFailure("MLYNAR_OUTPUT_DIR was removed or replaced by a symlink; it must stay a directory")
    try:
        checked = read_output_manifest(out_real)
    except OutputManifestError as e:
        raise StepFailure(str(e)) from e

    outputs: list[StepOutput] = []
    for out in checked:
        digest = hashlib.sha256()
        size = 0
        try:
            with open(out.path, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as e:
            raise StepFailure(f"output {out.index}: file {out.file!r} cannot be read: {e}") from e
        outputs.append(
            StepOutput(index=out.index, data_kind=out.data_kind, file=out.file, size=size, sha256=digest.hexdigest())
        )
    return outputs


def _real_out_dir(out_dir: Path) -> Path | None:
    """``out_dir`` if it is a directory without any symlink on its path (the agent builds it from
    the resolved work dir), else ``None``."""
    try:
        real = out_dir.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if real != out_dir or not real.is_dir():
        return None
    return real


def resolve_output_path(out_dir: Path, rel: str) -> Path | None:
    """The file of a recorded output, re-checked at download time (``None`` if no longer valid)."""
    out_real = _real_out_dir(out_dir)
    if out_real is None:
        return None
    try:
        real = (out_real / rel).resolve()
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(out_real) or not real.is_file():
        return None
    return real


# --- steps ------------------------------------------------------------------------------------


class Step:
    def __init__(self, step_id: str, sdir: StepDir, manifest: StepManifest, status: StepStatus) -> None:
        self.id = step_id
        self.dir = sdir
        self.manifest = manifest
        self.status = status
        self.done = asyncio.Event()  # set when terminal or deleted
        self.deleted = False
        self.task: asyncio.Task | None = None
        self.pgid: int | None = None
        self.cancel_requested = False
        self.expiry: asyncio.TimerHandle | None = None
        if status.terminal:
            self.done.set()


class StepManager:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.work_dir = settings.work_dir.expanduser().resolve()
        self.steps_dir = self.work_dir / "steps"
        self.tmp_dir = self.work_dir / "tmp"
        self.steps: dict[str, Step] = {}
        self.uploading: set[str] = set()
        self.stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_parallel)
        self._lock_fd: int | None = None
        self._background: set[asyncio.Task] = set()
        self._path = os.environ.get("PATH", os.defpath)

    # -- lifecycle --

    def open(self) -> None:
        """Create and lock the work directory, clear stale uploads and load persisted steps."""
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.steps_dir.mkdir(exist_ok=True)
            self.tmp_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise AgentConfigError(f"cannot create --work-dir {str(self.work_dir)!r}: {e.strerror or e}") from e
        fd = os.open(self.work_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AgentConfigError(
                    f"--work-dir {str(self.work_dir)!r} is in use by another machine agent"
                ) from e
            raise
        self._lock_fd = fd
        for stale in self.tmp_dir.iterdir():
            log.info("removing unfinished upload %s", stale.name)
            remove_tree(stale)
        self._load()

    def _load(self) -> None:
        for d in sorted(self.steps_dir.iterdir()):
            step_id = d.name
            if not valid_step_id(step_id) or not d.is_dir() or d.is_symlink():
                log.warning("ignoring unexpected entry %s in %s", d.name, self.steps_dir)
                continue
            sdir = StepDir(d)
            try:
                manifest = sdir.read_manifest()
                status = sdir.read_state()
            except (OSError, ValueError) as e:
                log.warning("step %s: unreadable state (%s); removing its sandbox", step_id, e, extra={"step_id": step_id})
                remove_tree(d)
                continue
            if not status.terminal:
                status.state = "failed"
                status.error = RESTARTED_ERROR
                status.finished_at = _now()
                sdir.write_state(status)
                log.warning("step %s: marked failed: %s", step_id, RESTARTED_ERROR, extra={"step_id": step_id})
            step = Step(step_id, sdir, manifest, status)
            self.steps[step_id] = step
            self._schedule_expiry(step)
        if self.steps:
            log.info("loaded %d finished step(s) from %s", len(self.steps), self.steps_dir)

    async def shutdown(self) -> None:
        """Kill every running step's process group and stop all step tasks. Persisted states of
        steps that were running are left as they are; the next start marks them failed."""
        self.stopping.set()
        tasks = []
        for step in list(self.steps.values()):
            if step.expiry is not None:
                step.expiry.cancel()
            if step.task is not None and not step.task.done():
                step.cancel_requested = True
                if _killpg(step.pgid, signal.SIGKILL):
                    log.info("step %s: killed process group %d (agent stopping)", step.id, step.pgid, extra={"step_id": step.id})
                step.task.cancel()
                tasks.append(step.task)
        for t in list(self._background):
            t.cancel()
            tasks.append(t)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- queries --

    def get(self, step_id: str) -> Step | None:
        return self.steps.get(step_id)

    def count(self, state: str) -> int:
        return sum(1 for s in self.steps.values() if s.status.state == state)

    # -- uploads --

    def new_upload_dir(self, step_id: str) -> StepDir:
        root = Path(tempfile.mkdtemp(prefix=f"{step_id}.", dir=self.tmp_dir))
        sdir = StepDir(root)
        sdir.create_layout()
        return sdir

    def accept(self, step_id: str, manifest: StepManifest, staged: StepDir) -> Step:
        """Move a completely received upload into ``steps/`` and start it."""
        final = StepDir(self.steps_dir / step_id)
        status = StepStatus(id=step_id)
        staged.write_manifest(manifest)
        staged.write_state(status)
        os.rename(staged.root, final.root)
        step = Step(step_id, final, manifest, status)
        self.steps[step_id] = step
        log.info("step %s: accepted: %s", step_id, shlex.join(manifest.command), extra={"step_id": step_id})
        step.task = asyncio.create_task(self._run(step), name=f"mlynar-agent-step-{step_id}")
        return step

    # -- deletion and expiry --

    async def delete(self, step_id: str) -> bool:
        step = self.steps.get(step_id)
        if step is None:
            return False
        if step.task is not None and not step.task.done():
            step.cancel_requested = True
            if _killpg(step.pgid, signal.SIGKILL):
                log.info("step %s: cancelled, killed process group %d", step_id, step.pgid, extra={"step_id": step_id})
            step.task.cancel()
            await asyncio.gather(step.task, return_exceptions=True)
        if step.expiry is not None:
            step.expiry.cancel()
        self.steps.pop(step_id, None)
        step.deleted = True
        step.done.set()
        await asyncio.to_thread(remove_tree, step.dir.root)
        log.info("step %s: deleted", step_id, extra={"step_id": step_id})
        return True

    def _schedule_expiry(self, step: Step) -> None:
        ttl = self.settings.result_ttl
        if ttl <= 0 or step.status.finished_at is None:
            return
        remaining = ttl - (_now() - step.status.finished_at).total_seconds()
        loop = asyncio.get_running_loop() if _has_running_loop() else None
        if loop is None:
            return
        step.expiry = loop.call_later(max(0.0, remaining), self._expire, step.id)

    def _expire(self, step_id: str) -> None:
        step = self.steps.get(step_id)
        if step is None or not step.status.terminal:
            return
        log.info("step %s: result expired after --result-ttl %ss; removing", step_id, self.settings.result_ttl, extra={"step_id": step_id})
        task = asyncio.create_task(self.delete(step_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- running --

    def _persist(self, step: Step) -> None:
        if step.deleted:
            return
        try:
            step.dir.write_state(step.status)
        except OSError as e:
            log.error("step %s: cannot write state.json: %s", step.id, e, extra={"step_id": step.id})

    def _finish(
        self, step: Step, state: str, error: str | None = None, exit_code: int | None = None, *, retryable: bool = True
    ) -> None:
        assert state in TERMINAL_STATES
        step.status.state = state  # type: ignore[assignment]
        step.status.error = error
        step.status.retryable = retryable
        if exit_code is not None:
            step.status.exit_code = exit_code
        step.status.finished_at = _now()
        self._persist(step)
        step.done.set()
        if state == "succeeded":
            log.info("step %s: succeeded with %d output(s)", step.id, len(step.status.outputs), extra={"step_id": step.id})
        else:
            log.info("step %s: %s: %s", step.id, state, error, extra={"step_id": step.id})
        if not step.deleted:
            self._schedule_expiry(step)

    def _allowed(self, argv: list[str]) -> bool:
        if not self.settings.allow:
            return True
        line = shlex.join(argv)
        return any(fnmatch.fnmatchcase(line, p) for p in self.settings.allow)

    def build_env(self, step: Step) -> dict[str, str]:
        """The step's environment, from scratch: nothing of the agent's own (token included)."""
        env = {"PATH": self._path, "HOME": str(step.dir.root), "LANG": "C.UTF-8"}
        env.update(step.manifest.env)
        for spec in step.manifest.inputs:
            env[spec.env] = str(step.dir.input_file(spec.name, spec.filename or spec.name))
        env["MLYNAR_OUTPUT_DIR"] = str(step.dir.out)
        return env

    async def _run(self, step: Step) -> None:
        argv = step.manifest.command
        try:
            if not self._allowed(argv):
                self._finish(
                    step,
                    "failed",
                    f"command {shlex.join(argv)!r} is not allowed by --allow patterns {self.settings.allow!r}",
                    retryable=False,  # the same command is refused again
                )
                return
            async with self._slots:
                await self._execute(step)
        except asyncio.CancelledError:
            _killpg(step.pgid, signal.SIGKILL)
            if not step.status.terminal and not self.stopping.is_set():
                self._finish(step, "cancelled", "cancelled by DELETE")
            raise
        except Exception as e:  # never leave a step hanging in running/queued
            log.exception("step %s: internal error", step.id, extra={"step_id": step.id})
            _killpg(step.pgid, signal.SIGKILL)
            if not step.status.terminal:
                self._finish(step, "failed", f"agent error: {type(e).__name__}: {e}")

    async def _execute(self, step: Step) -> None:
        argv = step.manifest.command
        step.status.state = "running"
        step.status.started_at = _now()
        self._persist(step)
        env = self.build_env(step)
        with open(step.dir.logs, "ab", buffering=0) as logf:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=step.dir.work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=_make_preexec(os.getpid()),
                )
            except OSError as e:
                msg = f"cannot start command {shlex.join(argv)!r}: {e.strerror or e}"
                logf.write((msg + "\n").encode())
                self._finish(step, "failed", msg)
                return
        step.pgid = proc.pid  # start_new_session: the child leads its own group
        log.info("step %s: running as pid %d: %s", step.id, proc.pid, shlex.join(argv), extra={"step_id": step.id})
        timeout = step.manifest.timeout_seconds
        timed_out = False
        try:
            try:
                rc = await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                timed_out = True
                log.info("step %s: timed out after %s s; SIGTERM to process group %d", step.id, timeout, step.pgid, extra={"step_id": step.id})
                _killpg(step.pgid, signal.SIGTERM)
                try:
                    rc = await asyncio.wait_for(proc.wait(), self.settings.kill_grace)
                except asyncio.TimeoutError:
                    log.info("step %s: still running after %s s grace; SIGKILL", step.id, self.settings.kill_grace, extra={"step_id": step.id})
                    _killpg(step.pgid, signal.SIGKILL)
                    rc = await proc.wait()
        finally:
            # Whatever the step left running in its group (background children) dies with it.
            _killpg(step.pgid, signal.SIGKILL)
        step.status.exit_code = rc
        if timed_out:
            self._finish(step, "failed", f"timed out after {timeout} s")
            return
        if rc != 0:
            if rc < 0:
                self._finish(step, "failed", f"exit code {rc} (killed by signal {-rc})")
            else:
                self._finish(step, "failed", f"exit code {rc}")
            return
        try:
            step.status.outputs = await asyncio.to_thread(collect_outputs, step.dir.out)
        except StepFailure as e:
            self._finish(step, "failed", str(e))
            return
        self._finish(step, "succeeded")


def _has_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False
