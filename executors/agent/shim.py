"""The step's anchor process under ``--isolation none``: ``python -I -S shim.py AGENT_PID UID GID -- PROGRAM ARGS...``.

Without a PID namespace nothing ties a step's processes together: a grandchild that calls
``setsid`` or double-forks leaves the process group and, re-parented to init, survives. This
shim makes itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``), so every orphan of the step's
tree is re-parented to it instead of init and the tree stays one tree under the shim's pid. It
then forks the step's program (dropping to ``UID``/``GID`` when they are >= 0, with
``no_new_privs``), reaps every process of the tree, and when the program exits kills whatever
is left of the tree before exiting with the program's status. ``SIGTERM`` (sent by the agent,
or by the kernel as the parent-death signal when the agent dies) kills the whole tree at once.

Standard library only and no imports from the project: it runs with ``-I -S`` for a fast start,
as the agent's user, outside any sandbox.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38


class _Stop(Exception):
    pass


def descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (via ``/proc/*/stat``), children before their own."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_tree() -> None:
    """SIGKILL every descendant until none is left, reaping them (they are all ours: subreaper)."""
    me = os.getpid()
    while True:
        pids = descendants(me)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap()
        time.sleep(0.005)  # let the kernel finish the exits before the next look
    reap()


def main(argv: list[str]) -> int:
    agent_pid, uid, gid = int(argv[1]), int(argv[2]), int(argv[3])
    assert argv[4] == "--", "usage: shim.py AGENT_PID UID GID -- PROGRAM ARGS..."
    program, args = argv[5], argv[5:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def stop(_sig: int, _frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != agent_pid:  # the agent died before the parent-death signal was armed
        return 137
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if uid >= 0:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            os.execv(program, args)
        except OSError as e:
            os.write(2, f"mlynar agent: cannot start {program}: {e.strerror or e}\n".encode())
        os._exit(127)
    status = None
    try:
        while status is None:
            child, st = os.waitpid(-1, 0)
            if child == pid:
                status = st
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_tree()
        return 137
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kill_tree()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)  # die the same way, so the agent sees the signal
        return 128 + sig
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
