"""How a step's processes are started, confined and ended: the one place for the sandbox view,
the user a step runs as, its resource limits and killing its whole process tree.

Two modes, decided once at start (:meth:`Isolation.detect`):

* ``bwrap`` — the step runs under Bubblewrap: a private mount namespace showing only the system
  directories (read-only), the step's sandbox (its ``work/`` and ``out/`` read-write, the rest,
  inputs included, read-only), the host owner's ``--read``/``--write`` grants, and fresh ``/proc``,
  ``/dev`` and ``/tmp``; the agent's work directory, other steps and the token file are not in
  it. A private PID namespace (``--unshare-pid``) whose init is bwrap: when the step's program
  exits, or bwrap is killed, or the agent dies (``--die-with-parent``), the kernel kills every
  process of the step. When the agent is root the program runs as ``--run-as-user`` (``setpriv``
  with no capabilities and ``no_new_privs``).
* ``none`` — no namespaces (bwrap missing or not working here). The step is started through
  :mod:`.shim`, a child subreaper, so that processes escaping with ``setsid`` or a double fork
  stay in one tree the agent can sweep; the program still runs as ``--run-as-user`` when the
  agent is root. The step sees everything its user can see.

In both modes resource limits (``setrlimit``) are set in the child before it executes anything,
and ending a step means: SIGTERM (timeouts, after which ``--kill-grace``) and SIGKILL to every
descendant found under the launcher in ``/proc``, repeated until none is left, then the launcher.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pwd
import resource
import signal
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .sandbox import StepDir
from .shim import descendants  # the shim runs stand-alone; one tree walk for both
from .settings import AgentConfigError, AgentSettings

log = logging.getLogger("mlynar.agent")

SHIM = Path(__file__).with_name("shim.py")

#: Read-only in every bwrap sandbox (when they exist on the host): what programs need to run.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
               "/run/systemd/resolve")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # the process image: libc is in it (find_library would spawn ldconfig)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


# --- the process tree -------------------------------------------------------------------------


def signal_descendants(root: int, sig: int) -> int:
    """Send ``sig`` to every descendant of ``root`` (not ``root``); how many processes it reached."""
    n = 0
    for pid in descendants(root):
        try:
            os.kill(pid, sig)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n


async def kill_tree(root: int) -> None:
    """SIGKILL every descendant of ``root`` until none is left, then ``root``. The launcher is
    killed last so that orphans keep being re-parented to it (the shim is a subreaper; under
    bwrap they are in its PID namespace) and the next look still finds them."""
    for _ in range(200):
        if not signal_descendants(root, signal.SIGKILL):
            break
        await asyncio.sleep(0.01)  # the kernel finishes the exits; then look again
    try:
        os.kill(root, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- limits and users -------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-process resource limits of a step (0 = not limited). ``processes`` is
    ``RLIMIT_NPROC``: the kernel counts every process of the step's *user*, not of the step."""

    cpu_seconds: int
    memory_bytes: int
    processes: int
    file_bytes: int

    def rlimits(self) -> list[tuple[int, int]]:
        pairs = [(resource.RLIMIT_CPU, self.cpu_seconds), (resource.RLIMIT_DATA, self.memory_bytes),
                 (resource.RLIMIT_NPROC, self.processes), (resource.RLIMIT_FSIZE, self.file_bytes),
                 (resource.RLIMIT_CORE, 0)]
        return [(r, v) for r, v in pairs if v > 0 or r == resource.RLIMIT_CORE]

    def public(self) -> dict[str, int]:
        return {"cpuSeconds": self.cpu_seconds, "memoryBytes": self.memory_bytes,
                "processes": self.processes, "fileBytes": self.file_bytes}


def _apply_rlimits(pairs: list[tuple[int, int]]) -> None:
    """In the child: lower each limit to the value (never above the inherited hard limit)."""
    for res, value in pairs:
        _soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        resource.setrlimit(res, (value, value))


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user steps run as when the agent is root."""

    name: str
    uid: int
    gid: int


def _run_as(settings: AgentSettings) -> RunAs | None:
    if os.geteuid() != 0:
        return None  # steps run as the agent's own user
    if not settings.run_as_user:
        log.warning("the agent runs as root and --run-as-user is empty: steps run as root")
        return None
    try:
        pw = pwd.getpwnam(settings.run_as_user)
    except KeyError:
        raise AgentConfigError(f"--run-as-user {settings.run_as_user!r}: no such user") from None
    if pw.pw_uid == 0:
        raise AgentConfigError(f"--run-as-user {settings.run_as_user!r} is root; give an unprivileged user")
    return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return str(uid)


def _searchable_by(path: Path, who: RunAs) -> Path | None:
    """The first directory on ``path`` (from ``/``) that ``who`` cannot traverse, or ``None``."""
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        if st.st_uid == who.uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == who.gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return d
    return None


def _parents(p: Path) -> list[str]:
    """bwrap arguments creating the missing parents of a mount point ``p`` traversable: bwrap
    itself would create them 0700 (root's when the agent is root) and a step running as another
    user could not reach what is mounted there. Parents that exist in the view are left as
    they are."""
    argv: list[str] = []
    for parent in list(reversed(p.parents))[1:]:
        argv += ["--perms", "0711", "--dir", str(parent)]
    return argv


# --- the isolation ----------------------------------------------------------------------------


@dataclass
class Isolation:
    """How this agent starts steps; see the module docstring."""

    mode: Literal["bwrap", "none"]
    reason: str  # why this mode (shown at start and in /v1/healthz)
    limits: Limits
    run_as: RunAs | None
    bwrap: str | None = None
    setpriv: str | None = None
    network: bool = True
    reads: list[Path] = field(default_factory=list)
    writes: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)  # the work dir and token file, never shown

    # -- start-up --

    @classmethod
    def detect(cls, settings: AgentSettings, work_dir: Path, path: str) -> "Isolation":
        """Decide the mode for ``settings.isolation`` (``auto``: bwrap when a probe sandbox
        works, else none). Raises :class:`AgentConfigError` when ``bwrap`` is asked for and does
        not work, or a grant or the user is wrong."""
        limits = Limits(settings.limit_cpu_seconds, settings.limit_memory_bytes, settings.limit_processes,
                        settings.limit_file_bytes)
        hidden = [work_dir] + ([settings.token_file.expanduser().resolve()] if settings.token_file else [])
        grants = {}
        for flag, paths in (("--read", settings.read), ("--write", settings.write)):
            resolved = []
            for p in paths:
                real = p.expanduser().resolve()
                if not real.exists():
                    raise AgentConfigError(f"{flag} {str(p)!r} does not exist")
                if real.is_relative_to(work_dir):  # a grant above the work dir is fine: it is masked
                    raise AgentConfigError(f"{flag} {str(p)!r} lies inside the agent's --work-dir")
                resolved.append(real)
            grants[flag] = resolved
        run_as = _run_as(settings)
        iso = cls("none", "", limits, run_as, network=settings.network,
                  reads=grants["--read"], writes=grants["--write"], hidden=hidden)
        if settings.isolation == "none":
            iso.reason = "--isolation none"
        else:
            problem = iso._setup_bwrap(path)
            if problem is None:
                iso.mode = "bwrap"
                iso.reason = f"bubblewrap ({iso.bwrap})"
            elif settings.isolation == "bwrap":
                raise AgentConfigError(f"--isolation bwrap: {problem}")
            else:
                iso.reason = problem
        if iso.mode == "none":
            if run_as is not None:
                blocked = _searchable_by(work_dir.parent, run_as)
                if blocked is not None:
                    raise AgentConfigError(
                        f"steps run as {run_as.name!r} without a sandbox, and cannot reach --work-dir "
                        f"{str(work_dir)!r}: {str(blocked)!r} is not searchable by them; choose a work dir "
                        "they can reach, or install bubblewrap")
                for d in (work_dir, work_dir / "steps"):
                    d.chmod(0o711)  # traversable, not listable: each sandbox is 0750 to the step's group
        return iso

    def _setup_bwrap(self, path: str) -> str | None:
        """Find bwrap (and setpriv when steps change user) and run a probe sandbox like a step's;
        the problem, or ``None`` when it works."""
        self.bwrap = shutil.which("bwrap", path=path)
        if self.bwrap is None:
            return "bwrap (Debian package bubblewrap) is not installed on the agent's PATH"
        if self.run_as is not None:
            self.setpriv = shutil.which("setpriv", path=path)
            if self.setpriv is None or not self.shows(Path(self.setpriv)):
                return "setpriv (util-linux) is needed to run steps as --run-as-user and is not in a system directory"
        with tempfile.TemporaryDirectory(prefix="mlynar-agent-probe-") as tmp:
            probe = StepDir(Path(tmp) / "probe")
            probe.create_layout()
            self.prepare(probe)
            true = shutil.which("true", path=path) or "/bin/true"
            argv = self._bwrap_argv(probe, [true])
            try:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                                   preexec_fn=self._preexec(os.getpid()))
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"bwrap cannot run here: {e}"
            if r.returncode != 0:
                err = r.stderr.decode(errors="replace").strip()
                return f"bwrap cannot run here (exit {r.returncode}): {err}"
        return None

    def public(self) -> dict:
        """What ``/v1/healthz`` says about isolation."""
        return {
            "isolation": self.mode,
            "isolationReason": self.reason,
            "runAs": self.run_as.name if self.run_as else _user_name(os.geteuid()),
            "limits": self.limits.public(),
            "read": [str(p) for p in self.reads],
            "write": [str(p) for p in self.writes],
        }

    # -- per step --

    def shows(self, p: Path) -> bool:
        """Whether the absolute path ``p`` (and what it resolves to) is inside a bwrap sandbox's view."""
        roots = [Path(os.path.realpath(d)) for d in SYSTEM_DIRS] + self.reads + self.writes
        return all(any(q.is_relative_to(r) for r in roots) for q in (Path(p), Path(os.path.realpath(p))))

    def visible(self, p: Path) -> bool:
        """Whether a step can see ``p``: under ``none`` everything its user may read is visible."""
        return self.mode == "none" or self.shows(p)

    def prepare(self, sdir: StepDir) -> None:
        """Ownership of a new sandbox: when steps run as another user, the sandbox and its inputs
        are readable by that user's group only and ``work/``, ``out/`` belong to the user."""
        if self.run_as is None:
            return
        me, gid = os.geteuid(), self.run_as.gid
        for d in (sdir.root, sdir.inputs):
            os.chown(d, me, gid)
            d.chmod(0o750)
        for dirpath, dirnames, filenames in os.walk(sdir.inputs):
            for name in dirnames:
                os.chown(os.path.join(dirpath, name), me, gid)
                os.chmod(os.path.join(dirpath, name), 0o750)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), me, gid)
                os.chmod(os.path.join(dirpath, name), 0o640)
        for d in (sdir.work, sdir.out):
            os.chown(d, self.run_as.uid, gid)
            d.chmod(0o700)

    def _bwrap_argv(self, sdir: StepDir, command: list[str]) -> list[str]:
        assert self.bwrap is not None
        argv = [self.bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
                "--unshare-uts", "--unshare-cgroup-try"]
        if not self.network:
            argv.append("--unshare-net")
        shown: list[Path] = []
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                argv += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                argv += ["--ro-bind", d, d]
                shown.append(Path(d))
        argv += ["--tmpfs", "/tmp"]  # before the grants: a --write /tmp grant shows the host's on purpose
        for p in self.reads:
            argv += [*_parents(p), "--ro-bind", str(p), str(p)]
        for p in self.writes:
            argv += [*_parents(p), "--bind", str(p), str(p)]
        # after the grants: a grant of "/" must not show the host's /proc (every process) or /dev
        argv += ["--proc", "/proc", "--dev", "/dev"]
        shown += self.reads + self.writes
        for h in self.hidden:  # the agent's own files are masked wherever a grant would show them
            if any(h.is_relative_to(s) for s in shown) and h.exists():
                argv += ["--tmpfs", str(h)] if h.is_dir() else ["--ro-bind", str(self._empty_file()), str(h)]
        root = str(sdir.root)
        argv += [*_parents(sdir.root), "--ro-bind", root, root, "--bind", str(sdir.work), str(sdir.work),
                 "--bind", str(sdir.out), str(sdir.out), "--chdir", str(sdir.work)]
        if self.run_as is not None:
            assert self.setpriv is not None
            argv += ["--", self.setpriv, f"--reuid={self.run_as.uid}", f"--regid={self.run_as.gid}",
                     "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        elif os.geteuid() == 0:
            argv += ["--cap-drop", "ALL"]
        return argv + ["--", *command]

    def _empty_file(self) -> Path:
        """An empty read-only file that stands in for a hidden file (``/dev/null`` would need a
        device mount)."""
        empty = self.hidden[0] / "empty"
        if not empty.exists():
            empty.touch(0o444)
        return empty

    def _preexec(self, agent_pid: int):
        """Runs in the child between fork and exec: die with the agent, then the limits."""
        pairs = self.limits.rlimits()

        def preexec() -> None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL if self.mode == "bwrap" else signal.SIGTERM, 0, 0, 0)
            if os.getppid() != agent_pid:  # the agent died before the parent-death signal was armed
                os._exit(137)
            _apply_rlimits(pairs)

        return preexec

    async def spawn(self, sdir: StepDir, command: list[str], env: dict[str, str], log_fd: int) -> asyncio.subprocess.Process:
        """Start the step's launcher (bwrap or the shim) in its own session; stdout and stderr go
        to ``log_fd``."""
        if self.mode == "bwrap":
            argv = self._bwrap_argv(sdir, command)
        else:
            uid, gid = (self.run_as.uid, self.run_as.gid) if self.run_as else (-1, -1)
            argv = [sys.executable, "-I", "-S", "-B", str(SHIM), str(os.getpid()), str(uid), str(gid), "--", *command]
        return await asyncio.create_subprocess_exec(
            *argv, cwd=sdir.work, env=env, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, preexec_fn=self._preexec(os.getpid()),
        )

    async def end(self, proc: asyncio.subprocess.Process, grace: float | None) -> None:
        """End a step's processes: with ``grace``, SIGTERM to the step's processes and up to
        ``grace`` seconds for the launcher to exit; then SIGKILL to whatever is left. A launcher
        that already exited left nothing behind (bwrap's namespace, the shim's sweep)."""
        if proc.returncode is not None:
            return
        if grace is not None:
            signal_descendants(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
            except asyncio.TimeoutError:
                pass
        await kill_tree(proc.pid)
        await proc.wait()
