"""Runs steps: one sandbox and one confined process tree per step, persisted state, restarts.

The :class:`StepManager` owns every step the agent knows. Each accepted step is checked by the
command policy (:mod:`.allow`), then gets an asyncio task (:meth:`StepManager._run`) that waits for
a ``--max-parallel`` slot, starts the command through the isolation (:mod:`.isolation`) with an
environment built from scratch, enforces the timeout, and then validates ``mlynar-out.json`` and
hashes the outputs.

Restarts (the agent is killed or stopped): a step that was only ``queued`` runs after the next
start; one that was ``running`` is reported ``failed`` with ``lost=True`` (the attempt ended
because of the agent, so the executor retries it without counting it against the operator's
retries); finished steps stay until the executor deletes them.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
import shlex
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from mlynar_events.outputs import MANIFEST, OUTPUT_DIR, OutputManifestError, parse_output_manifest, read_output_manifest

from .allow import Command, CommandPolicy, Refusal
from .isolation import Isolation
from .models import (
    TERMINAL_STATES,
    StepManifest,
    StepOutput,
    StepStatus,
    valid_step_id,
)
from .sandbox import StepDir, UnsafeFile, open_regular, remove_tree
from .settings import AgentConfigError, AgentSettings

log = logging.getLogger("mlynar.agent")

HASH_CHUNK = 1024**2
RESTARTED_ERROR = "agent restarted while the step was running"
STOPPED_ERROR = "agent stopped while the step was running"


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --- output validation ------------------------------------------------------------------------


class StepFailure(Exception):
    """The step's outputs are unacceptable; the message becomes the step's error."""


def collect_outputs(out_dir: Path) -> list[StepOutput]:
    """Check ``mlynar-out.json`` in ``out_dir`` (:func:`mlynar_events.outputs.read_output_manifest`),
    then the agent's own rule (:func:`.sandbox.open_regular`: the manifest and every output are
    regular files the step created, no symlink on the way, no hard link), and describe every
    output (size, sha256, read through the checked descriptor).

    ``out_dir`` must itself still be the real directory the agent created (a step cannot swap it
    for a symlink)."""
    out_real = _real_out_dir(out_dir)
    if out_real is None:
        raise StepFailure("MLYNAR_OUTPUT_DIR was removed or replaced by a symlink; it must stay a directory")
    try:
        checked = read_output_manifest(out_real)
        with os.fdopen(_open_checked(out_real, MANIFEST, "the manifest"), "rb") as f:
            names = [e.file for e in parse_output_manifest(f.read()).outputs]
    except OutputManifestError as e:
        raise StepFailure(str(e)) from e

    outputs: list[StepOutput] = []
    for out, name in zip(checked, names, strict=True):
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(_open_checked(out_real, name, f"output {out.index}"), "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as e:
            raise StepFailure(f"output {out.index}: file {out.file!r} cannot be read: {e}") from e
        outputs.append(
            StepOutput(index=out.index, data_kind=out.data_kind, file=out.file, size=size, sha256=digest.hexdigest())
        )
    return outputs


def _open_checked(out_real: Path, name: str, what: str) -> int:
    try:
        return open_regular(out_real, name)  # '.' and '//' are dropped, '..' is refused
    except UnsafeFile as e:
        raise StepFailure(f"{what}: {e}; outputs must be regular files created in {OUTPUT_DIR}") from None


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


def open_output(out_dir: Path, rel: str) -> int | None:
    """A descriptor of a recorded output, re-checked at download time (``None`` if no longer a
    regular, single-link file in the output directory)."""
    out_real = _real_out_dir(out_dir)
    if out_real is None:
        return None
    try:
        return open_regular(out_real, rel)
    except UnsafeFile:
        return None


# --- steps ---------------------------------------------------------------------------------


class Step:
    def __init__(self, step_id: str, sdir: StepDir, manifest: StepManifest, status: StepStatus) -> None:
        self.id = step_id
        self.dir = sdir
        self.manifest = manifest
        self.status = status
        self.done = asyncio.Event()  # set when terminal or deleted
        self.deleted = False
        self.task: asyncio.Task | None = None
        self.proc: asyncio.subprocess.Process | None = None  # the launcher (bwrap or the shim)
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
        #: The agent's own PATH, fixed at start: it finds programs and is the steps' PATH.
        self._path = os.environ.get("PATH", os.defpath)
        self.policy = CommandPolicy(settings.allow, self._path)
        self.isolation: Isolation | None = None

    # -- lifecycle --

    def open(self) -> None:
        """Create and lock the work directory, decide the isolation, clear stale uploads and load
        persisted steps (re-queueing those that never started)."""
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
        try:
            self.isolation = Isolation.detect(self.settings, self.work_dir, self._path)
        except BaseException:
            self.close()
            raise
        for stale in self.tmp_dir.iterdir():
            log.info("removing unfinished upload %s", stale.name)
            remove_tree(stale)
        self._load()

    def _load(self) -> None:
        requeued = 0
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
            step = Step(step_id, sdir, manifest, status)
            self.steps[step_id] = step
            if status.state == "running":
                self._lose(step, RESTARTED_ERROR)
            elif status.state == "queued":
                log.info("step %s: queued before the restart; queued again", step_id, extra={"step_id": step_id})
                assert self.isolation is not None
                self.isolation.prepare(sdir)  # the user steps run as may have changed
                self._start(step)
                requeued += 1
            else:
                self._schedule_expiry(step)
        if self.steps:
            log.info("loaded %d step(s) from %s, %d queued again", len(self.steps), self.steps_dir, requeued)

    def _lose(self, step: Step, error: str) -> None:
        """The attempt ended because of the agent: failed, ``lost``, retryable (see StepStatus.lost)."""
        step.status.lost = True
        self._finish(step, "failed", error, retryable=True)

    async def shutdown(self) -> None:
        """Stop every step: a running one is reported lost (persisted, so a long-poll answers it
        now and a restarted agent keeps saying so) and its process tree killed; a queued one stays
        queued on disk and runs after the next start. Call :meth:`close` afterwards."""
        running = [s for s in self.steps.values() if s.status.state == "running"]
        for step in running:  # no await before stopping is set: no request sees a half state
            self._lose(step, STOPPED_ERROR)
        self.stopping.set()
        tasks = []
        for step in list(self.steps.values()):
            if step.expiry is not None:
                step.expiry.cancel()
            if step.task is not None and not step.task.done():
                if step.proc is not None:
                    await self._end(step, None, "agent stopping")
                step.task.cancel()
                tasks.append(step.task)
        for t in list(self._background):
            t.cancel()
            tasks.append(t)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """Release the work directory."""
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
        """Move a completely received upload into ``steps/`` and start it (or refuse it at once)."""
        assert self.isolation is not None
        final = StepDir(self.steps_dir / step_id)
        status = StepStatus(id=step_id)
        staged.write_manifest(manifest)
        staged.write_state(status)
        self.isolation.prepare(staged)
        os.rename(staged.root, final.root)
        step = Step(step_id, final, manifest, status)
        self.steps[step_id] = step
        log.info("step %s: accepted: %s", step_id, shlex.join(manifest.command), extra={"step_id": step_id})
        self._start(step)
        return step

    def _start(self, step: Step) -> None:
        """Check the command (:mod:`.allow`, and that the sandbox shows the program) and start
        the step's task; a refused step fails now, before anything runs."""
        assert self.isolation is not None
        try:
            command = self.policy.check(step.manifest.command, step.manifest.env, step.dir.work)
            if not self.isolation.visible(Path(command.argv[0])):
                raise Refusal(f"program {command.argv[0]!r} is not visible inside the step's sandbox "
                              f"(isolation {self.isolation.mode}); the host owner can show it with --read DIR")
        except Refusal as e:
            self._finish(step, "failed", str(e), retryable=e.retryable)
            return
        step.task = asyncio.create_task(self._run(step, command), name=f"mlynar-agent-step-{step.id}")

    # -- deletion and expiry --

    async def delete(self, step_id: str) -> bool:
        step = self.steps.get(step_id)
        if step is None:
            return False
        if step.task is not None and not step.task.done():
            if step.proc is not None:
                await self._end(step, None, "cancelled by DELETE")
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
        step.expiry = asyncio.get_running_loop().call_later(max(0.0, remaining), self._expire, step.id)

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
            log.info("step %s: %s: %s", step.id, state, error,
                     extra={"step_id": step.id, "retryable": retryable, "lost": step.status.lost})
        if not step.deleted:
            self._schedule_expiry(step)

    async def _end(self, step: Step, grace: float | None, why: str) -> None:
        assert self.isolation is not None and step.proc is not None
        log.info("step %s: ending its processes (%s)", step.id, why, extra={"step_id": step.id})
        await self.isolation.end(step.proc, grace)

    def build_env(self, step: Step) -> dict[str, str]:
        """The step's environment, from scratch: nothing of the agent's own (token included). The
        agent's PATH comes last so no manifest can replace it (the policy refuses one that tries)."""
        env = {"HOME": str(step.dir.work), "LANG": "C.UTF-8"}
        env.update(step.manifest.env)
        for spec in step.manifest.inputs:
            env[spec.env] = str(step.dir.input_file(spec.name, spec.filename or spec.name))
        env["MLYNAR_OUTPUT_DIR"] = str(step.dir.out)
        env["PATH"] = self._path
        return env

    async def _run(self, step: Step, command: Command) -> None:
        try:
            async with self._slots:
                if self.stopping.is_set():  # a slot freed by the stop itself: stay queued for the next start
                    return
                await self._execute(step, command)
        except asyncio.CancelledError:
            if not step.status.terminal and not self.stopping.is_set():
                self._finish(step, "cancelled", "cancelled by DELETE")
            raise
        except Exception as e:  # never leave a step hanging in running/queued
            log.exception("step %s: internal error", step.id, extra={"step_id": step.id})
            if not step.status.terminal:
                self._finish(step, "failed", f"agent error: {type(e).__name__}: {e}")

    async def _execute(self, step: Step, command: Command) -> None:
        assert self.isolation is not None
        step.status.state = "running"
        step.status.started_at = _now()
        self._persist(step)
        env = self.build_env(step)
        with open(step.dir.logs, "ab", buffering=0) as logf:
            try:
                proc = await self.isolation.spawn(step.dir, command.argv, env, logf.fileno())
            except OSError as e:
                msg = f"cannot start command {shlex.join(step.manifest.command)!r}: {e.strerror or e}"
                logf.write((msg + "\n").encode())
                self._finish(step, "failed", msg)
                return
        step.proc = proc
        log.info("step %s: running as pid %d (%s): %s", step.id, proc.pid, self.isolation.mode, command.checked,
                 extra={"step_id": step.id})
        timeout = step.manifest.timeout_seconds
        timed_out = False
        try:
            try:
                rc = await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
            except asyncio.TimeoutError:
                timed_out = True
                await self._end(step, self.settings.kill_grace, f"timed out after {timeout} s")
                rc = await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled or failed while it ran: nothing may outlive it
                await self.isolation.end(proc, None)
        if step.status.terminal:  # lost while it ran (the agent is stopping): that is its outcome
            return
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
