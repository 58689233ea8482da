"""The machine agent as a boundary, each guarantee tried as the attack (real agent processes, real
steps, real files): the command check on resolved paths, variables a manifest may not set, the
token out of reach in /proc, outputs that must be files the step created, every process of a
step killed (setsid and double-fork escapees included), the Bubblewrap view and the host
owner's grants, resource limits, and what a restart does to queued and running steps.

Bubblewrap-specific cases run when ``bwrap`` is installed (CI installs it, see .ci/run)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path
from typing import AsyncIterator

import pytest

from executors.machine_client import AgentClient, AgentError

try:
    from agent_helpers import (PYTHON, REPO, AgentProcess, bwrap_works, clean_env, processes_with, wait_for,
                               wait_terminal)
except ImportError:  # tests/ became a package
    from tests.agent_helpers import (PYTHON, REPO, AgentProcess, bwrap_works, clean_env, processes_with, wait_for,
                                     wait_terminal)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the agent's isolation is Linux-only")

TOKEN = "boundary-token-6f1d2c9a"
PY = sys.executable
SYS_PY = "/usr/bin/python3"  # inside the sandbox's read-only system directories
UNCONFINED = ("--isolation", "none", "--run-as-user", "")
ROOT = os.geteuid() == 0
needs_bwrap = pytest.mark.skipif(not bwrap_works(), reason="bwrap is not installed (CI installs bubblewrap)")

NO_OUTPUTS = 'import json, os; open(os.environ["MLYNAR_OUTPUT_DIR"] + "/mlynar-out.json", "w").write(json.dumps({"outputs": []}))'
REPORT = '''
import json, os
def report(data):
    out = os.environ["MLYNAR_OUTPUT_DIR"]
    open(out + "/report.json", "w").write(json.dumps(data))
    open(out + "/mlynar-out.json", "w").write(json.dumps({"outputs": [{"dataKind": "report", "file": "report.json"}]}))
def attempt(fn):
    try:
        return ["ok", fn()]
    except OSError as e:
        return ["refused", e.strerror]
'''


@contextlib.asynccontextmanager
async def running_agent(work: Path, *args: str, env: dict[str, str] | None = None
                        ) -> AsyncIterator[tuple[AgentProcess, AgentClient]]:
    proc = AgentProcess(work, *args, env=env if env is not None else clean_env(MLYNAR_TOKEN=TOKEN)).start()
    try:
        async with AgentClient(proc.url, TOKEN, connect_timeout=5, read_timeout=30) as c:
            yield proc, c
    finally:
        proc.stop()


async def run_report(c: AgentClient, tmp_path: Path, step_id: str, body: str, python: str = PY,
                     files: dict[str, Path] | None = None, **manifest) -> dict:
    """Run a step that reports what it could do; its report (the step must succeed)."""
    await c.put_step(step_id, {"command": [python, "-c", REPORT + textwrap.dedent(body)], **manifest}, files or {})
    st = await wait_terminal(c, step_id)
    assert st["state"] == "succeeded", st
    await c.download_output(step_id, 0, tmp_path / f"{step_id}.json")
    return json.loads((tmp_path / f"{step_id}.json").read_text())


def assert_refused(st: dict, *phrases: str) -> None:
    """A step refused before anything ran: failed, permanent, never started."""
    assert st["state"] == "failed" and st["retryable"] is False and st["startedAt"] is None, st
    for phrase in phrases:
        assert phrase in st["error"], st["error"]


# --- finding 6: --allow on resolved paths, PATH and loader variables ---------------------------


async def test_allow_checks_resolved_paths_not_the_text(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.py").write_text(NO_OUTPUTS)
    ran = tmp_path / "evil-ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(ran)!r}, 'w').write('pwned')")
    (allowed / "link.py").symlink_to(evil)
    (allowed / "sub").symlink_to(tmp_path)
    async with running_agent(tmp_path / "w", *UNCONFINED, "--allow", f"{PY} {allowed}/*") as (_, c):
        attacks = {"dotdot": f"{allowed}/../evil.py", "symlink": f"{allowed}/link.py",
                   "dir-symlink": f"{allowed}/sub/evil.py", "option": f"--x={allowed}/../evil.py"}
        for step_id, arg in attacks.items():
            await c.put_step(step_id, {"command": [PY, arg]}, {})
            st = await wait_terminal(c, step_id)
            assert_refused(st, "is not allowed by --allow patterns", str(evil) if step_id != "option" else "evil.py")
        await c.put_step("allowed", {"command": [PY, f"{allowed}/ok.py"]}, {})
        assert (await wait_terminal(c, "allowed"))["state"] == "succeeded"
    assert not ran.exists()


async def test_manifest_cannot_set_path_or_loader_variables(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    ran = tmp_path / "fake-ran"
    fake = fake_bin / "true"
    fake.write_text(f"#!/bin/sh\necho pwned > {ran}\n")
    fake.chmod(0o755)
    async with running_agent(tmp_path / "w", *UNCONFINED, "--allow", "true") as (proc, c):
        for var, value in [("PATH", str(fake_bin)), ("LD_PRELOAD", str(tmp_path / "evil.so")),
                           ("LD_LIBRARY_PATH", str(tmp_path)), ("PYTHONPATH", str(tmp_path)),
                           ("BASH_ENV", str(fake)), ("NODE_OPTIONS", "--require /tmp/x.js"),
                           # a provider module loaded into anything that uses libcrypto
                           ("OPENSSL_CONF", str(tmp_path / "o.cnf")), ("OPENSSL_MODULES", str(tmp_path)),
                           ("BASH_FUNC_true", "() { echo pwned; }"), ("GIT_CONFIG_COUNT", "1"),
                           ("PYTHONWARNINGS", "ignore::evil.Warning"), ("LESSOPEN", f"|{fake} %s")]:
            step_id = "env-" + var.lower().replace("_", "-")
            await c.put_step(step_id, {"command": ["true"], "env": {var: value}}, {})
            assert_refused(await wait_terminal(c, step_id), f"the manifest sets {var}")
        # argv[0] is looked up on the agent's PATH: the real `true` runs (and writes no manifest)
        await c.put_step("agent-path", {"command": ["true"], "env": {"HOME": str(fake_bin)}}, {})
        st = await wait_terminal(c, "agent-path")
        assert st["startedAt"] is not None and "operator wrote no mlynar-out.json" in st["error"], st
        # a program relative to the step's directory is not found on the agent's PATH
        await c.put_step("relative", {"command": ["./true"]}, {})
        st = await wait_terminal(c, "relative")
        assert st["state"] == "failed" and st["startedAt"] is None and "not an executable file" in st["error"]
    assert not ran.exists()


# --- finding 7: the token, outputs, escapees ---------------------------------------------------

PROBE_PROC = '''
found = {}
pid = os.getpid()
while pid > 1:
    entry = {}
    for what in ("environ", "cmdline"):
        entry[what] = attempt(lambda: open(f"/proc/{pid}/{what}", "rb").read().decode(errors="replace"))
    found[pid] = entry
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
report(found)
'''


@pytest.mark.parametrize("how", ["MLYNAR_TOKEN", "--token-file", "--token"])
async def test_a_step_cannot_read_the_token_from_proc(tmp_path: Path, how: str) -> None:
    """The step walks up its ancestors (the agent among them) and reads their environ and
    cmdline; as the agent's own user (root here) the reads succeed, and find no token."""
    env, args = clean_env(), list(UNCONFINED)
    if how == "MLYNAR_TOKEN":
        env["MLYNAR_TOKEN"] = TOKEN
    elif how == "--token-file":
        (tmp_path / "token").write_text(TOKEN + "\n")
        args += ["--token-file", str(tmp_path / "token")]
    else:
        args += ["--token", TOKEN]
    async with running_agent(tmp_path / "w", *args, env=env) as (proc, c):
        found = await run_report(c, tmp_path, "probe", PROBE_PROC)
        assert (await c.health())["status"] == "ok"  # the token still works
    agent_pid = str(proc.proc.pid)
    assert agent_pid in found, found.keys()
    if ROOT:
        assert found[agent_pid]["environ"][0] == "ok" and found[agent_pid]["cmdline"][0] == "ok"
    assert TOKEN not in json.dumps(found)


async def test_outputs_must_be_regular_files_the_step_created(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    attacks = {
        "hard-link": (f'os.link({str(secret)!r}, out + "/x")', "x", "is a hard link"),
        "symlink-inside": ('open(out + "/real", "w").write("r"); os.symlink("real", out + "/x")', "x", "symlink"),
        "through-dir-link": ('os.mkdir(out + "/d"); open(out + "/d/f", "w").write("f"); os.symlink("d", out + "/e")',
                             "e/f", "symlink"),
        "manifest-link": (f'os.link({str(secret)!r}, out + "/x")', None, "the manifest: 'mlynar-out.json' is a hard link"),
    }
    async with running_agent(tmp_path / "w", *UNCONFINED) as (proc, c):
        for step_id, (make, name, error) in attacks.items():
            if name is None:  # the manifest itself is a second name of a file elsewhere
                (tmp_path / "outside.json").write_text('{"outputs": []}')
                body = f'os.link({str(tmp_path / "outside.json")!r}, out + "/mlynar-out.json")'
            else:
                body = make + f'\nopen(out + "/mlynar-out.json", "w").write(json.dumps({{"outputs": [{{"dataKind": "k", "file": {name!r}}}]}}))'
            script = "import json, os\nout = os.environ['MLYNAR_OUTPUT_DIR']\n" + body
            await c.put_step(step_id, {"command": [PY, "-c", script]}, {})
            st = await wait_terminal(c, step_id)
            assert st["state"] == "failed" and error in st["error"] and st["outputs"] == [], (step_id, st)
            with pytest.raises(AgentError) as ei:
                await c.download_output(step_id, 0, tmp_path / f"{step_id}.out")
            assert ei.value.status == 409 and not (tmp_path / f"{step_id}.out").exists()
        # nor are the logs a way out: a hard link in place of logs.txt is served as nothing
        swap = f'import os; os.remove("../logs.txt"); os.link({str(secret)!r}, "../logs.txt")'
        await c.put_step("logs-link", {"command": [PY, "-c", swap]}, {})
        await wait_terminal(c, "logs-link")
        await c.download_logs("logs-link", tmp_path / "logs")
        assert b"host secret" not in (tmp_path / "logs").read_bytes()
    assert secret.read_text() == "host secret"


ESCAPE = '''
import os, signal, sys
tag, mode = sys.argv[1], sys.argv[2]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the grandchild: its own session, re-parented once its parent exits
        os.execv(sys.executable, [sys.executable, "-c",
                 "import signal; open('ready', 'w').write('up'); signal.pause()", "escapee-" + tag])
    os._exit(0)
if mode == "exit":  # exit once the test has seen the escapee: it opens the FIFO "go" for writing
    os.mkfifo("go")
    open("go").read()
    open(os.environ["MLYNAR_OUTPUT_DIR"] + "/mlynar-out.json", "w").write('{"outputs": []}')
    sys.exit(0)
signal.pause()
'''


def open_fifo(path: Path) -> int | None:
    """A write end of the FIFO ``path`` once its reader waits on it (then closing it releases the reader)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


@pytest.mark.parametrize("isolation", ["none", pytest.param("bwrap", marks=needs_bwrap)])
@pytest.mark.parametrize("how", ["exit", "delete", "timeout", "agent-killed"])
async def test_setsid_and_double_fork_escapees_die_with_the_step(tmp_path: Path, isolation: str, how: str) -> None:
    tag = uuid.uuid4().hex
    args = ["--isolation", isolation]
    if isolation == "none":
        args += ["--run-as-user", ""]
    manifest = {"command": [SYS_PY, "-c", ESCAPE, tag, how], "timeoutSeconds": 2 if how == "timeout" else None}
    work = tmp_path / "w"
    async with running_agent(work, *args) as (proc, c):
        await c.put_step("esc", manifest, {})
        await wait_for(lambda: (work / "steps" / "esc" / "work" / "ready").exists(), timeout=20, what="the escapee")
        assert processes_with("escapee-" + tag), "the escapee must be running before the step ends"
        if how == "exit":
            fd = await wait_for(lambda: open_fifo(work / "steps" / "esc" / "work" / "go"), what="the step's gate")
            os.close(fd)
            st = await wait_terminal(c, "esc")
            assert st["state"] == "succeeded", st
        elif how == "delete":
            assert (await c.delete_step("esc")) == {"deleted": True}
        elif how == "timeout":
            st = await wait_terminal(c, "esc")
            assert st["error"] == "timed out after 2 s"
        else:
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
        await wait_for(lambda: not processes_with("escapee-" + tag) and not processes_with(tag), timeout=15,
                       what=f"every process of the step to die ({how}, isolation {isolation})")


# --- isolation: the view, grants, user, limits ------------------------------------------------


@needs_bwrap
async def test_bwrap_shows_only_the_sandbox_system_dirs_and_grants(tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # granted read-only; holds the agent's work dir and token file too
    shared.mkdir()
    (shared / "data.csv").write_text("1,2,3\n")
    (shared / "token").write_text(TOKEN)
    (shared / "token").chmod(0o644)  # even readable, it is masked
    results = tmp_path / "results"  # granted read-write
    results.mkdir()
    if ROOT:
        os.chown(results, 65534, 65534)
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    (tmp_path / "in.txt").write_text("input")
    work = shared / "w"
    args = ["--isolation", "bwrap", "--token-file", str(shared / "token"), "--read", str(shared),
            "--write", str(results)]
    async with running_agent(work, *args, env=clean_env()) as (proc, c):
        health = await c.health()
        assert health["isolation"] == "bwrap" and health["read"] == [str(shared)] and health["write"] == [str(results)]
        other = await run_report(c, tmp_path, "other", "report({})", python=SYS_PY)
        assert other == {}
        found = await run_report(c, tmp_path, "probe", f'''
            import pathlib
            work = pathlib.Path({str(work)!r})
            report({{
                "uid": os.getuid(),
                "secret": attempt(lambda: open({str(secret)!r}).read()),
                "other_step": attempt(lambda: open(str(work / "steps/other/out/report.json")).read()),
                "agent_lock": os.path.exists(str(work / "agent.lock")),
                "steps_visible": attempt(lambda: sorted(os.listdir(str(work / "steps")))),
                "token": attempt(lambda: open({str(shared / "token")!r}).read()),
                "read_grant": attempt(lambda: open({str(shared / "data.csv")!r}).read()),
                "read_grant_write": attempt(lambda: open({str(shared / "new.txt")!r}, "w").write("x")),
                "write_grant": attempt(lambda: open({str(results / "plot.txt")!r}, "w").write("plot")),
                "input_write": attempt(lambda: open(os.environ["IN"], "w").write("changed")),
                "etc_write": attempt(lambda: open("/etc/mlynar-was-here", "w").write("x")),
                "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                "root": sorted(os.listdir("/")),
            }})
        ''', python=SYS_PY, inputs=[{"name": "in0", "env": "IN"}], files={"in0": tmp_path / "in.txt"})
    assert found["secret"][0] == "refused" and found["other_step"][0] == "refused"
    assert found["agent_lock"] is False and "other" not in json.dumps(found["steps_visible"])
    assert found["token"] == ["ok", ""]  # the token file is an empty file in the sandbox
    assert found["read_grant"] == ["ok", "1,2,3\n"] and found["read_grant_write"][0] == "refused"
    assert found["write_grant"][0] == "ok" and (results / "plot.txt").read_text() == "plot"
    assert found["input_write"][0] == "refused" and found["etc_write"][0] == "refused"
    assert not (shared / "new.txt").exists() and not Path("/etc/mlynar-was-here").exists()
    assert len(found["pids"]) <= 2, found["pids"]  # bwrap's init and the step: nothing of the host
    assert "root" not in found["root"] and "home" not in found["root"]
    if ROOT:
        assert found["uid"] == 65534


@needs_bwrap
async def test_no_network_leaves_a_step_only_its_own_loopback(tmp_path: Path) -> None:
    """With --no-network the step cannot reach anything, the agent's own API on 127.0.0.1 included."""
    probe = '''
        import socket, urllib.parse
        host, port = urllib.parse.urlsplit(os.environ["AGENT"]).hostname, urllib.parse.urlsplit(os.environ["AGENT"]).port
        report({"connect": attempt(lambda: socket.create_connection((host, port), timeout=5).close())})
    '''
    for flag, expected in (("--network", "ok"), ("--no-network", "refused")):
        async with running_agent(tmp_path / flag.strip("-"), "--isolation", "bwrap", flag) as (proc, c):
            found = await run_report(c, tmp_path, "net", probe, python=SYS_PY, env={"AGENT": proc.url})
        assert found["connect"][0] == expected, (flag, found)


@needs_bwrap
async def test_a_program_outside_the_view_is_refused_until_granted(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    shutil.copy(shutil.which("true") or "/bin/true", tools / "prog")
    async with running_agent(tmp_path / "w", "--isolation", "bwrap") as (_, c):
        await c.put_step("hidden-program", {"command": [str(tools / "prog")]}, {})
        assert_refused(await wait_terminal(c, "hidden-program"), "is not visible inside the step's sandbox", "--read")
    async with running_agent(tmp_path / "w", "--isolation", "bwrap", "--read", str(tools)) as (_, c):
        await c.put_step("granted-program", {"command": [str(tools / "prog")]}, {})
        st = await wait_terminal(c, "granted-program")  # it ran (and, being `true`, wrote no manifest)
        assert st["startedAt"] is not None and "operator wrote no mlynar-out.json" in st["error"], st


async def test_resource_limits_stop_runaway_steps(tmp_path: Path) -> None:
    limits = ["--limit-file-bytes", str(1024**2), "--limit-memory-bytes", str(512 * 1024**2), "--limit-cpu-seconds", "1"]
    work = tmp_path / "w"
    async with running_agent(work, *UNCONFINED, *limits) as (_, c):
        h = await c.health()
        assert h["limits"] == {"cpuSeconds": 1, "memoryBytes": 512 * 1024**2, "processes": 4096, "fileBytes": 1024**2}
        await c.put_step("big-file", {"command": [PY, "-c", "open('big', 'wb').write(b'x' * (4 * 1024**2))"]}, {})
        st = await wait_terminal(c, "big-file")
        assert st["state"] == "failed", st  # Python ignores SIGXFSZ: the write fails with EFBIG instead
        await c.download_logs("big-file", tmp_path / "file.log")
        assert "File too large" in (tmp_path / "file.log").read_text()
        assert (work / "steps" / "big-file" / "work" / "big").stat().st_size <= 1024**2
        await c.put_step("big-memory", {"command": [PY, "-c", "b = bytearray(2 * 1024**3)"]}, {})
        st = await wait_terminal(c, "big-memory")
        assert st["state"] == "failed" and st["exitCode"] == 1, st
        await c.download_logs("big-memory", tmp_path / "mem.log")
        assert "MemoryError" in (tmp_path / "mem.log").read_text()
        await c.put_step("busy", {"command": [PY, "-c", "while True: pass"], "timeoutSeconds": 60}, {})
        st = await wait_terminal(c, "busy", timeout=30)
        assert st["state"] == "failed" and "killed by signal" in st["error"], st


@needs_bwrap
@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC counts the user's processes: only a dedicated user (root -> nobody) gives a stable count")
async def test_a_fork_bomb_stops_at_the_process_limit(tmp_path: Path) -> None:
    async with running_agent(tmp_path / "w", "--isolation", "bwrap", "--limit-processes", "16") as (_, c):
        found = await run_report(c, tmp_path, "forks", '''
            import signal
            forked, error = 0, None
            while forked < 64:
                try:
                    pid = os.fork()
                except OSError as e:
                    error = e.strerror
                    break
                if pid == 0:
                    signal.pause()
                forked += 1
            report({"forked": forked, "error": error})
        ''', python=SYS_PY)
    assert found["forked"] < 16 and found["error"] == "Resource temporarily unavailable", found


async def test_isolation_is_reported_and_bwrap_refused_when_missing(tmp_path: Path) -> None:
    no_bwrap = clean_env(MLYNAR_TOKEN=TOKEN, PATH=str(tmp_path / "empty-path"))
    r = subprocess.run([PYTHON, "-m", "executors.agent", "--port", "0", "--work-dir", str(tmp_path / "w0"),
                        "--isolation", "bwrap"], cwd=REPO, env=no_bwrap, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--isolation bwrap: bwrap (Debian package bubblewrap) is not installed" in r.stderr
    assert not (tmp_path / "w0" / "steps").exists() or not any((tmp_path / "w0" / "steps").iterdir())
    async with running_agent(tmp_path / "w1", "--run-as-user", "", env=no_bwrap) as (proc, c):
        h = await c.health()
        assert h["isolation"] == "none" and "not installed" in h["isolationReason"]
    assert "steps are NOT isolated" in proc.log_text()
    if bwrap_works():
        async with running_agent(tmp_path / "w2") as (_, c):
            h = await c.health()
            assert h["isolation"] == "bwrap" and h["runAs"] == ("nobody" if ROOT else h["runAs"])


@pytest.mark.skipif(not ROOT, reason="steps change user only when the agent is root")
async def test_as_root_without_bwrap_steps_run_as_nobody(tmp_path: Path) -> None:
    no_bwrap = clean_env(MLYNAR_TOKEN=TOKEN, PATH="/nonexistent")
    # a work dir that nobody cannot reach is refused at start, with the reason
    r = subprocess.run([PYTHON, "-m", "executors.agent", "--port", "0", "--work-dir", str(tmp_path / "w")],
                       cwd=REPO, env=no_bwrap, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot reach --work-dir" in r.stderr and "is not searchable" in r.stderr
    base = Path(tempfile.mkdtemp(prefix="mlynar-agent-test-", dir="/tmp"))
    try:
        base.chmod(0o711)
        async with running_agent(base / "w", env=no_bwrap) as (proc, c):
            assert (await c.health())["runAs"] == "nobody"
            found = await run_report(c, tmp_path, "who", f'''
                report({{"uid": os.getuid(), "agent_environ": attempt(lambda: open("/proc/{proc.proc.pid}/environ").read()),
                         "other_sandbox": attempt(lambda: os.listdir({str(base / "w" / "steps")!r}))}})
            ''', python=SYS_PY)
        assert found["uid"] == 65534
        assert found["agent_environ"][0] == "refused" and found["other_sandbox"][0] == "refused"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_grant_inside_the_work_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w" / "steps").mkdir(parents=True)
    r = subprocess.run([PYTHON, "-m", "executors.agent", "--port", "0", "--work-dir", str(tmp_path / "w"),
                        "--write", str(tmp_path / "w" / "steps"), *UNCONFINED],
                       cwd=REPO, env=clean_env(MLYNAR_TOKEN=TOKEN), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "lies inside the agent's --work-dir" in r.stderr


# --- issue 10 finding 5: restarts ---------------------------------------------------------------

LEDGER_STEP = '''
import json, os, signal
with open(os.environ["LEDGER"], "a") as f:
    f.write(os.environ["NAME"] + "\\n")
if os.environ.get("BLOCK"):  # until the agent goes away
    signal.pause()
open(os.environ["MLYNAR_OUTPUT_DIR"] + "/mlynar-out.json", "w").write(json.dumps({"outputs": []}))
'''


def ledger_step(tmp_path: Path, name: str, *, gate: bool = False) -> dict:
    env = {"LEDGER": str(tmp_path / "ledger"), "NAME": name}
    if gate:
        env["BLOCK"] = "1"
    return {"command": [PY, "-c", LEDGER_STEP, f"{tmp_path}:{name}"], "env": env}


def ledger(tmp_path: Path) -> list[str]:
    path = tmp_path / "ledger"
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
async def test_restart_requeues_queued_steps_and_reports_running_ones_lost(tmp_path: Path, stop: str) -> None:
    work = tmp_path / "w"
    args = (*UNCONFINED, "--max-parallel", "1", "--log-level", "DEBUG")
    async with running_agent(work, *args) as (proc, c):
        await c.put_step("finished", ledger_step(tmp_path, "finished"), {})
        done = await wait_terminal(c, "finished")
        assert done["state"] == "succeeded"
        await c.put_step("running", ledger_step(tmp_path, "running", gate=True), {})
        await wait_for(lambda: "running" in ledger(tmp_path), what="the running step to start")
        await c.put_step("queued", ledger_step(tmp_path, "queued"), {})
        assert (await c.status("queued", wait=0.3))["state"] == "queued"
        if stop == "SIGKILL":
            proc.proc.send_signal(signal.SIGKILL)
        else:  # a long-poll waiting during a graceful stop is answered with the lost attempt
            poll = asyncio.ensure_future(c.status("running", wait=30))
            await wait_for(lambda: "step running: long-poll" in proc.log_text(), what="the long-poll to wait")
            proc.proc.send_signal(signal.SIGTERM)
            answer = await asyncio.wait_for(poll, 10)
            assert answer["state"] == "failed" and answer["lost"] is True and answer["retryable"] is True, answer
        proc.proc.wait(15)
    await wait_for(lambda: not processes_with(f"{tmp_path}:running"), what="the running step's process to die")
    assert ledger(tmp_path) == ["finished", "running"]  # the queued step never started

    async with running_agent(work, *args) as (proc, c):
        lost = await c.status("running")
        assert lost["state"] == "failed" and lost["lost"] is True and lost["retryable"] is True
        assert lost["error"] == ("agent restarted while the step was running" if stop == "SIGKILL"
                                 else "agent stopped while the step was running")
        queued = await wait_terminal(c, "queued")
        assert queued["state"] == "succeeded" and queued["lost"] is False, queued
        assert await c.status("finished") == done  # kept until the executor deletes it
        assert (await c.delete_step("finished")) == {"deleted": True}
        assert not (work / "steps" / "finished").exists()
    assert ledger(tmp_path) == ["finished", "running", "queued"]  # each ran exactly once


# --- a web page cannot drive an agent (cross-site requests, DNS rebinding) -----------------------


async def test_a_web_page_cannot_submit_steps_to_an_agent(tmp_path: Path) -> None:
    import aiohttp

    proc = AgentProcess(tmp_path / "w", "--insecure-no-auth", *UNCONFINED).start()
    try:
        port = proc.url.rsplit(":", 1)[1]
        form = aiohttp.FormData()
        form.add_field("manifest", json.dumps({"command": ["true"]}), content_type="application/json")
        async with aiohttp.ClientSession() as http:
            attacks = [
                ("PUT", "/v1/steps/rebound", {"Host": f"evil.example:{port}"}),  # DNS rebinding
                ("PUT", "/v1/steps/crosssite", {"Origin": "http://evil.example"}),  # a cross-site fetch
                ("GET", "/v1/healthz", {"Host": f"evil.example:{port}"}),
            ]
            for method, path, headers in attacks:
                async with http.request(method, proc.url + path, headers=headers,
                                        data=form if method == "PUT" else None) as r:
                    assert r.status == 403, (path, headers, await r.text())
            async with AgentClient(proc.url, None) as c:  # the executor's own calls still work
                assert (await c.health())["status"] == "ok"
                for step_id in ("rebound", "crosssite"):
                    with pytest.raises(AgentError):
                        await c.status(step_id)  # 404: never created
    finally:
        proc.stop()
    async with running_agent(tmp_path / "w2", *UNCONFINED) as (_, c):  # with a token: no Origin either
        async with aiohttp.ClientSession() as http:
            async with http.get(c.url + "/v1/healthz", headers={"Origin": "http://evil.example",
                                                                "Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 403


@needs_bwrap
async def test_a_grant_of_the_root_does_not_show_the_hosts_processes(tmp_path: Path) -> None:
    async with running_agent(tmp_path / "w", "--isolation", "bwrap", "--read", "/") as (_, c):
        await c.put_step("procs", {"command": [SYS_PY, "-c",
                                               "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"]}, {})
        await wait_terminal(c, "procs")
        await c.download_logs("procs", tmp_path / "procs.txt")
    pids = json.loads((tmp_path / "procs.txt").read_text().splitlines()[0])
    # a private PID namespace: bwrap, the step and its children, not every process of the host
    assert pids[0] == 1 and len(pids) < 10, pids
