"""The machine agent (executors.agent) and its client (executors.machine_client), over real HTTP
against real agent processes (and, where settings need to be small, an in-process agent)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from executors.agent import AgentConfigError, AgentSettings, start_agent
from executors.machine_client import AgentClient, AgentError
try:
    from agent_helpers import (
    PYTHON,
    REPO,
    AgentProcess,
    clean_env,
    group_gone,
    pid_gone,
    wait_for,
    wait_terminal,
)
except ImportError:  # tests/ became a package
    from tests.agent_helpers import (
    PYTHON,
    REPO,
    AgentProcess,
    clean_env,
    group_gone,
    pid_gone,
    wait_for,
    wait_terminal,
)

TOKEN = "s3cret-token-for-tests"
SECRET = "agent-only-secret-value"
PY = sys.executable  # not a pyenv shim, which would add its own variables
#: The protocol tests run the test's own interpreter on the test's files, as the agent's user; the
#: isolation itself is tested in tests/test_agent_isolation.py.
UNCONFINED = ("--isolation", "none", "--run-as-user", "")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the agent's process handling is Linux-first")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """One shared agent; the token comes from MLYNAR_TOKEN and a secret sits in its environment."""
    work = tmp_path_factory.mktemp("agent") / "work"
    proc = AgentProcess(work, "--max-parallel", "4", *UNCONFINED, env=clean_env(MLYNAR_TOKEN=TOKEN, AGENT_SECRET=SECRET)).start()
    yield proc
    proc.stop()


@pytest.fixture
async def client(agent):
    c = AgentClient(agent.url, TOKEN, connect_timeout=5, read_timeout=30)
    yield c
    await c.close()


def py_step(script: str, *, env: dict | None = None, inputs: list | None = None, timeout: int | None = None) -> dict:
    return {
        "command": [PY, "-c", textwrap.dedent(script)],
        "env": env or {},
        "inputs": inputs or [],
        "timeoutSeconds": timeout,
    }


WRITE_OUTPUTS = """
import json, os, pathlib
out = pathlib.Path(os.environ["MLYNAR_OUTPUT_DIR"])
"""


def leftovers(work: Path, step_id: str) -> list[str]:
    """Anything a (failed) upload of ``step_id`` may have left in the agent's work dir."""
    found = [p.name for p in (work / "tmp").iterdir()] if (work / "tmp").exists() else []
    if (work / "steps" / step_id).exists():
        found.append(f"steps/{step_id}")
    return found


# --- auth and startup -------------------------------------------------------------------------


async def test_missing_token_is_401_and_wrong_token_is_403(agent):
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.url + "/v1/healthz") as r:
            assert r.status == 401
            assert (await r.json())["error"] == "missing bearer token"
        async with s.get(agent.url + "/v1/steps/x", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 403
            assert (await r.json())["error"] == "wrong bearer token"
        async with s.put(agent.url + "/v1/steps/x", headers={"Authorization": "Basic abc"}, data=b"x") as r:
            assert r.status == 401
    bad = AgentClient(agent.url, "wrong")
    try:
        with pytest.raises(AgentError) as ei:
            await bad.health()
        assert ei.value.status == 403 and agent.url in str(ei.value) and "wrong bearer token" in str(ei.value)
    finally:
        await bad.close()


async def test_healthz(client):
    h = await client.health()
    assert h["status"] == "ok" and h["maxParallel"] == 4 and isinstance(h["running"], int) and h["version"]


def _run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "executors.agent", "--port", "0", "--work-dir", str(tmp_path / "w"), *args],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=30,
    )


def test_refuses_to_start_without_token(tmp_path):
    r = _run_cli(["--host", "127.0.0.1"], tmp_path)
    assert r.returncode == 2
    assert "refusing to start without a bearer token" in r.stderr and "--token" in r.stderr

    r = _run_cli(["--host", "0.0.0.0", "--insecure-no-auth"], tmp_path)
    assert r.returncode == 2
    assert "non-loopback --host '0.0.0.0'" in r.stderr and "--insecure-no-auth" in r.stderr

    r = _run_cli(["--token-file", str(tmp_path / "missing")], tmp_path)
    assert r.returncode == 2 and "cannot read --token-file" in r.stderr


async def test_insecure_no_auth_on_loopback_starts(tmp_path):
    proc = AgentProcess(tmp_path / "w", "--insecure-no-auth").start()
    try:
        async with AgentClient(proc.url, None) as c:
            assert (await c.health())["status"] == "ok"
    finally:
        assert proc.stop() == 0


async def test_token_file_and_work_dir_lock(tmp_path):
    (tmp_path / "tok").write_text(TOKEN + "\n")
    settings = AgentSettings(port=0, token_file=tmp_path / "tok", work_dir=tmp_path / "w")
    running = await start_agent(settings)
    try:
        async with AgentClient(running.url, TOKEN) as c:
            assert (await c.health())["status"] == "ok"
        with pytest.raises(AgentConfigError, match="in use by another machine agent"):
            await start_agent(settings)
    finally:
        await running.stop()


# --- running steps ----------------------------------------------------------------------------


async def test_full_step_outputs_and_logs(client, tmp_path):
    payload = os.urandom(700_000)  # several chunks each way
    (tmp_path / "data.bin").write_bytes(payload)
    script = WRITE_OUTPUTS + """
data = pathlib.Path(os.environ["INPUT_FILE"]).read_bytes()
print("hello from the step, got", len(data), "bytes", flush=True)
(out / "copy.bin").write_bytes(data)
(out / "sub").mkdir()
(out / "sub" / "meta.json").write_text(json.dumps({"size": len(data), "greeting": os.environ["GREETING"]}))
(out / "mlynar-out.json").write_text(json.dumps({"outputs": [
    {"dataKind": "blob", "file": "copy.bin"},
    {"dataKind": "meta", "file": "sub/meta.json"},
]}))
"""
    manifest = py_step(script, env={"GREETING": "hi"},
                       inputs=[{"name": "in0", "filename": "data.bin", "env": "INPUT_FILE"}])
    st = await client.put_step("full-1", manifest, {"in0": tmp_path / "data.bin"})
    assert st["id"] == "full-1" and st["state"] in {"queued", "running"}
    st = await wait_terminal(client, "full-1")
    assert st["state"] == "succeeded", st
    assert st["exitCode"] == 0 and st["error"] is None and st["startedAt"] and st["finishedAt"]
    meta = json.dumps({"size": len(payload), "greeting": "hi"}).encode()
    assert [(o["index"], o["dataKind"], o["file"], o["size"]) for o in st["outputs"]] == [
        (0, "blob", "copy.bin", len(payload)),
        (1, "meta", "sub/meta.json", len(meta)),
    ]
    d0 = await client.download_output("full-1", 0, tmp_path / "dl" / "0", expected_sha256=st["outputs"][0]["sha256"])
    assert (tmp_path / "dl" / "0").read_bytes() == payload
    assert d0.sha256 == hashlib.sha256(payload).hexdigest() == st["outputs"][0]["sha256"]
    await client.download_output("full-1", 1, tmp_path / "dl" / "1")
    assert (tmp_path / "dl" / "1").read_bytes() == meta
    assert st["outputs"][1]["sha256"] == hashlib.sha256(meta).hexdigest()
    await client.download_logs("full-1", tmp_path / "logs.txt")
    assert f"hello from the step, got {len(payload)} bytes" in (tmp_path / "logs.txt").read_text()

    with pytest.raises(AgentError) as ei:
        await client.download_output("full-1", 2, tmp_path / "dl" / "2")
    assert ei.value.status == 404 and not (tmp_path / "dl" / "2").exists()
    with pytest.raises(AgentError, match="sha256 mismatch"):
        await client.download_output("full-1", 0, tmp_path / "dl" / "x", expected_sha256="0" * 64)
    assert not (tmp_path / "dl" / "x").exists()
    assert (await client.delete_step("full-1")) == {"deleted": True}


async def test_step_environment_is_built_from_scratch(client, agent, tmp_path):
    (tmp_path / "in.txt").write_text("x")
    script = WRITE_OUTPUTS + """
(out / "env.json").write_text(json.dumps(dict(os.environ)))
(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "env", "file": "env.json"}]}))
"""
    manifest = py_step(script, env={"FOO": "bar"}, inputs=[{"name": "a", "filename": "../../in.txt", "env": "IN_A"}])
    await client.put_step("env-1", manifest, {"a": tmp_path / "in.txt"})
    st = await wait_terminal(client, "env-1")
    assert st["state"] == "succeeded", st
    await client.download_output("env-1", 0, tmp_path / "env.json")
    env = json.loads((tmp_path / "env.json").read_text())
    assert set(env) - {"LC_CTYPE"} == {"PATH", "HOME", "LANG", "FOO", "IN_A", "MLYNAR_OUTPUT_DIR"}
    assert env["FOO"] == "bar" and env["LANG"] == "C.UTF-8"
    sandbox = agent.work_dir.resolve() / "steps" / "env-1"
    assert env["HOME"] == str(sandbox / "work")
    assert env["MLYNAR_OUTPUT_DIR"] == str(sandbox / "out")
    assert env["IN_A"] == str(sandbox / "inputs" / "a" / "in.txt")  # the filename was reduced to its basename
    dumped = json.dumps(env)
    assert TOKEN not in dumped and SECRET not in dumped


async def test_idempotent_put_runs_once_and_conflicting_manifest_is_409(client, agent, tmp_path):
    counter = tmp_path / "count.txt"
    script = WRITE_OUTPUTS + """
with open(os.environ["COUNTER"], "a") as f:
    f.write("ran\\n")
(out / "mlynar-out.json").write_text(json.dumps({"outputs": []}))
"""
    manifest = py_step(script, env={"COUNTER": str(counter)})
    first = await client.put_step("idem-1", manifest, {})
    again = await client.put_step("idem-1", manifest, {})  # while queued or running
    assert again["id"] == "idem-1" and first["state"] in {"queued", "running"}
    st = await wait_terminal(client, "idem-1")
    assert st["state"] == "succeeded" and st["outputs"] == []
    later = await client.put_step("idem-1", manifest, {})
    assert later == st
    code, body = await _raw_put(agent.url, "idem-1", [("manifest", json.dumps(manifest).encode())])
    assert (code, body) == (200, st)
    assert counter.read_text() == "ran\n"

    other = dict(manifest, env={"COUNTER": str(counter), "X": "1"})
    with pytest.raises(AgentError) as ei:
        await client.put_step("idem-1", other, {})
    assert ei.value.status == 409 and "different manifest" in str(ei.value)
    assert counter.read_text() == "ran\n"


@pytest.mark.parametrize(
    "step_id, script, error",
    [
        ("esc-dotdot", """(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "k", "file": "../../etc/passwd"}]}))""",
         "output 0: file '../../etc/passwd' resolves outside MLYNAR_OUTPUT_DIR"),
        ("esc-link", """(out / "p").symlink_to("/etc/passwd")
(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "k", "file": "p"}]}))""",
         "output 0: file 'p' resolves outside MLYNAR_OUTPUT_DIR"),
        ("esc-abs", """(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "k", "file": "/etc/passwd"}]}))""",
         "output 0: file '/etc/passwd' resolves outside MLYNAR_OUTPUT_DIR"),
        ("no-manifest", "pass", "operator wrote no mlynar-out.json in MLYNAR_OUTPUT_DIR"),
        ("bad-json", """(out / "mlynar-out.json").write_text("{nope")""", "mlynar-out.json is not valid JSON"),
        ("bad-shape", """(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"file": "x"}]}))""",
         "mlynar-out.json does not have the shape"),
        ("missing-file", """(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "k", "file": "nope.txt"}]}))""",
         "output 0: file 'nope.txt' does not exist"),
        ("a-dir", """(out / "d").mkdir()
(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "k", "file": "d"}]}))""",
         "output 0: file 'd' is not a regular file"),
        ("exit-3", "raise SystemExit(3)", "exit code 3"),
    ],
)
async def test_bad_outputs_fail_the_step(client, tmp_path, step_id, script, error):
    await client.put_step(step_id, py_step(WRITE_OUTPUTS + script), {})
    st = await wait_terminal(client, step_id)
    assert st["state"] == "failed", st
    assert error in st["error"]
    assert st["outputs"] == []
    with pytest.raises(AgentError) as ei:
        await client.download_output(step_id, 0, tmp_path / "x")
    assert ei.value.status == 409


async def test_command_not_found_fails(client):
    await client.put_step("nocmd", {"command": ["/nonexistent/program", "x"]}, {})
    st = await wait_terminal(client, "nocmd")
    assert st["state"] == "failed" and "cannot start command '/nonexistent/program x'" in st["error"]


async def test_allow_patterns(tmp_path):
    proc = AgentProcess(tmp_path / "w", *UNCONFINED, "--allow", "python3 *", "--allow", "true", env=clean_env(MLYNAR_TOKEN=TOKEN)).start()
    try:
        async with AgentClient(proc.url, TOKEN) as c:
            await c.put_step("denied", {"command": ["sh", "-c", "echo hi > /tmp/should-not-exist"]}, {})
            st = await wait_terminal(c, "denied")
            assert st["state"] == "failed" and st["startedAt"] is None
            sh = os.path.realpath(shutil.which("sh"))
            assert st["error"] == (
                f"command \"sh -c 'echo hi > /tmp/should-not-exist'\" (resolved: \"{sh} -c 'echo hi > /tmp/should-not-exist'\") "
                "is not allowed by --allow patterns ['python3 *', 'true']"
            )
            assert st["retryable"] is False and not os.path.exists("/tmp/should-not-exist")
            script = 'import json, os; open(os.environ["MLYNAR_OUTPUT_DIR"] + "/mlynar-out.json", "w").write(json.dumps({"outputs": []}))'
            await c.put_step("allowed", {"command": ["python3", "-c", script]}, {})
            st = await wait_terminal(c, "allowed")
            assert st["state"] == "succeeded", st
    finally:
        proc.stop()


async def test_timeout_kills_the_whole_process_tree(client, tmp_path):
    pidfile = tmp_path / "pids"
    manifest = {
        "command": ["sh", "-c", 'echo "$$ $(ps -o pgid= -p $$)" > "$PIDFILE"; sleep 300 & echo $! >> "$PIDFILE"; sleep 300'],
        "env": {"PIDFILE": str(pidfile)},
        "timeoutSeconds": 1,
    }
    await client.put_step("timeout-1", manifest, {})
    st = await wait_terminal(client, "timeout-1", timeout=20)
    assert st["state"] == "failed" and st["error"] == "timed out after 1 s"
    lines = pidfile.read_text().split()
    pid, pgid, grandchild = int(lines[0]), int(lines[1]), int(lines[2])
    await wait_for(lambda: pid_gone(pid) and pid_gone(grandchild), timeout=10, what="the step and its child to die")
    await wait_for(lambda: group_gone(pgid), timeout=15, what=f"process group {pgid} to disappear")


async def test_delete_cancels_a_running_step(client, agent, tmp_path):
    pidfile = tmp_path / "pid"
    await client.put_step("cancel-1", {"command": ["sh", "-c", 'echo $$ > "$PIDFILE"; sleep 300 & sleep 300'],
                                       "env": {"PIDFILE": str(pidfile)}}, {})
    await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the step to start")
    assert (await client.status("cancel-1"))["state"] == "running"
    pgid = int(pidfile.read_text())
    assert (await client.delete_step("cancel-1")) == {"deleted": True}
    with pytest.raises(AgentError) as ei:
        await client.status("cancel-1")
    assert ei.value.status == 404 and "unknown step" in str(ei.value)
    assert not (agent.work_dir / "steps" / "cancel-1").exists()
    await wait_for(lambda: group_gone(pgid), timeout=15, what=f"process group {pgid} to disappear")
    with pytest.raises(AgentError) as ei:
        await client.delete_step("cancel-1")
    assert ei.value.status == 404


async def test_long_poll_returns_when_the_step_finishes(client, tmp_path):
    gate = tmp_path / "gate"
    # the step blocks reading a FIFO until the test opens it for writing
    os.mkfifo(gate)
    script = WRITE_OUTPUTS + """
open(os.environ["GATE"]).read()
(out / "mlynar-out.json").write_text(json.dumps({"outputs": []}))
"""
    await client.put_step("poll-1", py_step(script, env={"GATE": str(gate)}), {})
    st = await client.status("poll-1", wait=0.3)
    assert st["state"] in {"queued", "running"}

    poll = asyncio.create_task(client.status("poll-1", wait=30))

    def open_gate() -> int | None:  # succeeds once the step has opened the FIFO for reading
        try:
            return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return None

    fd = await wait_for(open_gate, what="the step to open its gate")
    t0 = time.monotonic()
    os.close(fd)
    st = await asyncio.wait_for(poll, 15)
    assert st["state"] == "succeeded" and time.monotonic() - t0 < 10  # not the full 30 s


# --- bad input --------------------------------------------------------------------------------


async def _raw_put(url: str, step_id: str, parts: list[tuple[str, bytes]] | None, *, body: bytes | None = None,
                   content_type: str | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        if parts is not None:
            mp = aiohttp.MultipartWriter("form-data")
            for name, data in parts:
                p = mp.append(data, {"Content-Type": "application/octet-stream"})
                p.set_content_disposition("form-data", name=name)
            data = mp
        else:
            data = body
        headers = {"Content-Type": content_type} if content_type else None
        async with s.put(f"{url}/v1/steps/{step_id}", data=data, headers=headers) as r:
            return r.status, await r.json()


GOOD = json.dumps({"command": ["true"], "inputs": [{"name": "in0", "filename": "d.json", "env": "IN"}]}).encode()


@pytest.mark.parametrize(
    "parts, status, error",
    [
        ([("manifest", b"{not json")], 400, "manifest is not valid JSON"),
        ([("manifest", b'{"command": []}')], 400, "invalid manifest"),
        ([("manifest", b'{"command": ["true"], "env": {"BAD-KEY": "x"}}')], 400, "invalid manifest"),
        ([("manifest", b'{"command": ["true"], "inputs": [{"name": "..", "env": "X"}]}')], 400, "invalid manifest"),
        ([("manifest", b'{"command": ["true"], "inputs": [{"name": "a", "filename": "x/..", "env": "X"}]}')], 400, "invalid manifest"),
        ([("manifest", b'{"command": ["true"], "inputs": [{"name": "a", "env": "1X"}]}')], 400, "invalid manifest"),
        ([("manifest", b'{"command": ["true"], "timeoutSeconds": "soon"}')], 400, "invalid manifest"),
        ([("manifest", b'{"command": ["true"], "surprise": 1}')], 400, "invalid manifest"),
        ([("manifest", GOOD)], 400, "missing input part(s)"),
        ([("manifest", GOOD), ("in0", b"{}"), ("extra", b"zzz")], 400, "unexpected multipart part"),
        ([("manifest", GOOD), ("in0", b"{}"), ("in0", b"{}")], 400, "duplicate multipart part"),
        ([("in0", b"{}"), ("manifest", GOOD)], 400, "the first multipart part must be named 'manifest'"),
        ([], 400, "the first multipart part must be named 'manifest'"),
    ],
)
async def test_bad_put_is_400_and_leaves_nothing(agent, parts, status, error):
    code, body = await _raw_put(agent.url, "bad-put", parts)
    assert (code, body["error"]) == (status, error), body
    assert "detail" in body
    assert leftovers(agent.work_dir, "bad-put") == []


async def test_bad_requests(agent, client):
    code, body = await _raw_put(agent.url, "x", None, body=b"{}", content_type="application/json")
    assert code == 400 and body["error"] == "expected multipart/form-data"
    code, body = await _raw_put(agent.url, "x", None, body=b"garbage", content_type="multipart/form-data; boundary=zz")
    assert code == 400
    for bad_id in ["Upper", "-lead", "a_b", "x" * 129]:
        code, body = await _raw_put(agent.url, bad_id, [("manifest", b'{"command": ["true"]}')])
        assert code == 400 and body["error"] == "invalid step id", bad_id
        assert not (agent.work_dir / "steps" / bad_id).exists()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        for q in ["0", "61", "abc", "nan", "-1"]:
            async with s.get(f"{agent.url}/v1/steps/whatever?wait={q}") as r:
                assert r.status == 400, q
                assert (await r.json())["error"] == "invalid wait"
        async with s.get(f"{agent.url}/v1/nothing-here") as r:
            assert r.status == 404 and "error" in await r.json()
        async with s.post(f"{agent.url}/v1/steps/abc") as r:
            assert r.status == 405 and "error" in await r.json()
    for call in (client.status("unknown-step"), client.delete_step("unknown-step")):
        with pytest.raises(AgentError) as ei:
            await call
        assert ei.value.status == 404 and ei.value.error == "unknown step"
    assert leftovers(agent.work_dir, "x") == []


async def test_too_large_upload_is_413_and_leaves_nothing(tmp_path):
    running = await start_agent(AgentSettings(port=0, token=TOKEN, work_dir=tmp_path / "w", max_input_bytes=1000))
    try:
        (tmp_path / "big").write_bytes(b"x" * 5000)
        async with AgentClient(running.url, TOKEN) as c:
            manifest = {"command": ["true"], "inputs": [{"name": "in0", "env": "IN"}]}
            with pytest.raises(AgentError) as ei:
                await c.put_step("big-1", manifest, {"in0": tmp_path / "big"})
            assert ei.value.status == 413
            # chunked upload (no Content-Length): the limit is enforced while streaming
            async def gen():
                yield b"y" * 800
                yield b"y" * 800

            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
                mp = aiohttp.MultipartWriter("form-data")
                mp.append(json.dumps(manifest)).set_content_disposition("form-data", name="manifest")
                mp.append(gen()).set_content_disposition("form-data", name="in0")
                async with s.put(f"{running.url}/v1/steps/big-2", data=mp) as r:
                    assert r.status == 413, await r.text()
        work = tmp_path / "w"
        assert leftovers(work, "big-1") == [] and leftovers(work, "big-2") == []
    finally:
        await running.stop()


async def test_aborted_upload_leaves_nothing(tmp_path):
    running = await start_agent(AgentSettings(port=0, token=TOKEN, work_dir=tmp_path / "w"))
    try:
        head = (
            f"PUT /v1/steps/abort-1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=BB\r\nContent-Length: 10000000\r\n\r\n"
            "--BB\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n"
            '{"command": ["true"], "inputs": [{"name": "in0", "env": "IN"}]}\r\n'
            "--BB\r\nContent-Disposition: form-data; name=\"in0\"\r\n\r\n" + "z" * 1_000_000
        ).encode()
        _, port = running.host, running.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        await writer.drain()
        work = tmp_path / "w"
        await wait_for(lambda: list((work / "tmp").glob("*/inputs/in0/in0")), what="the upload to start")
        writer.close()
        await wait_for(lambda: leftovers(work, "abort-1") == [], what="the half upload to be removed")
        assert running._manager.get("abort-1") is None
    finally:
        await running.stop()


# --- queueing, expiry, restart ----------------------------------------------------------------


async def test_max_parallel_queues_and_ttl_expires(tmp_path):
    work = tmp_path / "w"
    running = await start_agent(AgentSettings(port=0, token=TOKEN, work_dir=work, max_parallel=1, result_ttl=1.0))
    try:
        async with AgentClient(running.url, TOKEN) as c:
            await c.put_step("slow", {"command": ["sleep", "300"]}, {})
            await wait_for(lambda: c.status("slow"), what="slow to exist")
            await wait_for(lambda: _state_is(c, "slow", "running"), what="slow to run")
            ok = 'import json, os; open(os.environ["MLYNAR_OUTPUT_DIR"] + "/mlynar-out.json", "w").write(json.dumps({"outputs": []}))'
            await c.put_step("fast", {"command": [PY, "-c", ok]}, {})
            st = await c.status("fast", wait=0.3)
            assert st["state"] == "queued"
            h = await c.health()
            assert h["running"] == 1 and h["maxParallel"] == 1
            await c.delete_step("slow")
            st = await wait_terminal(c, "fast")
            assert st["state"] == "succeeded"
            # --result-ttl: the finished step disappears by itself
            await wait_for(lambda: _is_gone(c, "fast"), timeout=10, what="the result to expire")
            # its files go after it is forgotten (removed off the event loop)
            await wait_for(lambda: not (work / "steps" / "fast").exists(), timeout=10, what="its files to go")
    finally:
        await running.stop()


async def _state_is(c: AgentClient, step_id: str, state: str) -> bool:
    return (await c.status(step_id))["state"] == state


async def _is_gone(c: AgentClient, step_id: str) -> bool:
    try:
        await c.status(step_id)
    except AgentError as e:
        return e.status == 404
    return False


async def test_restart_keeps_finished_results(tmp_path):
    work = tmp_path / "w"
    env = clean_env(MLYNAR_TOKEN=TOKEN)
    pidfile = tmp_path / "pid"
    proc = AgentProcess(work, *UNCONFINED, env=env).start()
    try:
        async with AgentClient(proc.url, TOKEN) as c:
            script = WRITE_OUTPUTS + """
(out / "r.txt").write_text("result")
(out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "t", "file": "r.txt"}]}))
"""
            await c.put_step("keep-1", py_step(script), {})
            done = await wait_terminal(c, "keep-1")
            assert done["state"] == "succeeded"
            hang = "import os, signal; open(os.environ['PIDFILE'], 'w').write(str(os.getpid())); signal.pause()"
            await c.put_step("hang-1", {"command": [PY, "-c", hang], "env": {"PIDFILE": str(pidfile)}}, {})
            await wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the hanging step to start")
    finally:
        proc.stop(signal.SIGKILL)  # a crash: nothing is cleaned up by the agent
    child = int(pidfile.read_text())
    # PR_SET_PDEATHSIG: the step's process does not outlive a killed agent
    await wait_for(lambda: pid_gone(child), timeout=10, what="the orphaned step to die")

    proc = AgentProcess(work, *UNCONFINED, env=env).start()
    try:
        async with AgentClient(proc.url, TOKEN) as c:
            st = await c.status("keep-1")
            assert st == done
            await c.download_output("keep-1", 0, tmp_path / "r.txt", expected_sha256=done["outputs"][0]["sha256"])
            assert (tmp_path / "r.txt").read_text() == "result"
            hung = await c.status("hang-1")
            assert hung["state"] == "failed" and hung["error"] == "agent restarted while the step was running"
            # re-attaching to a step that exists does not run it again
            assert (await c.put_step("keep-1", py_step(script), {}))["state"] == "succeeded"
    finally:
        assert proc.stop() == 0


async def test_client_reports_connection_refused(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with AgentClient(url, TOKEN, connect_timeout=2) as c:
        with pytest.raises(AgentError) as ei:
            await c.health()
    assert ei.value.status is None and url in str(ei.value) and "cannot connect" in str(ei.value)


async def test_stop_kills_running_steps_and_sandbox_swaps_are_refused(tmp_path):
    work = tmp_path / "w"
    running = await start_agent(AgentSettings(port=0, token=TOKEN, work_dir=work))
    pidfile = tmp_path / "pid"
    try:
        async with AgentClient(running.url, TOKEN) as c:
            # a step that swaps its output directory for a symlink to / cannot publish /etc/passwd
            swap = """
import json, os
out = os.environ["MLYNAR_OUTPUT_DIR"]
os.rmdir(out)
os.symlink("/", out)
"""
            await c.put_step("swap-1", py_step(swap), {})
            st = await wait_terminal(c, "swap-1")
            assert st["state"] == "failed" and "MLYNAR_OUTPUT_DIR was removed or replaced" in st["error"]
            # ... nor serve a foreign file as its logs
            await c.put_step("logs-1", py_step('import os; os.remove("../logs.txt"); os.symlink("/etc/passwd", "../logs.txt")'), {})
            await wait_terminal(c, "logs-1")
            await c.download_logs("logs-1", tmp_path / "logs")
            assert (tmp_path / "logs").read_bytes() == b""

            await c.put_step("run-1", {"command": ["sh", "-c", 'echo $$ > "$PIDFILE"; sleep 300 & sleep 300'],
                                       "env": {"PIDFILE": str(pidfile)}}, {})
            await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the step to start")
    finally:
        await running.stop()
    pgid = int(pidfile.read_text())
    await wait_for(lambda: group_gone(pgid), timeout=15, what=f"process group {pgid} to disappear")


async def test_client_reports_read_timeout():
    release = asyncio.Event()

    async def silent(reader, writer):  # accepts the request, answers nothing until released
        await reader.read(65536)
        await release.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        async with AgentClient(url, TOKEN, connect_timeout=2, read_timeout=0.3) as c:
            with pytest.raises(AgentError) as ei:
                await c.health()
        assert ei.value.status is None and url in str(ei.value) and "timed out" in str(ei.value)
    finally:
        release.set()
        server.close()
        await server.wait_closed()
