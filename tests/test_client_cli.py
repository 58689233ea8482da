"""The client CLI end to end: a real ``mlynar serve`` subprocess (embedded NATS, an API token, the
built-in machine), and the CLI run as subprocesses against it, as a user runs it: apply the
examples, submit Mlynar's README example with ``--watch``, read it back as JSON, download its
output, read its history, a failing step, Ctrl-C while watching, a terminated run, and errors."""

from __future__ import annotations

import json
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from agent_helpers import clean_env
from support import EXAMPLES, REPO, CuttingProxy

BIN = Path(sys.executable).parent / "mlynar"
MLYNAR = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "mlynar_events.cli"]
TOKEN = "cli-test-token-0123456789"
RUN_ID = re.compile(r"run ([0-9a-f-]{36}) created")
README_EXAMPLE = ["--upload", f"number-array-json={EXAMPLES / 'data' / 'numbers.json'}",
                  "--param", "sum.MULTIPLY_BY=5", "--param", "length.MULTIPLY_BY=3",
                  "--param", "average.MULTIPLY_BY=2"]
HOLD = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: not-ours}
spec: {}
---
apiVersion: mlynar.dev/v1alpha1
kind: DataKind
metadata: {name: cli-hold-input}
spec: {displayName: DISPLAY}
---
apiVersion: mlynar.dev/v1alpha1
kind: Operator
metadata: {name: cli-hold}
spec:
  machine: local
  command: ["python3", "-c", "import threading; threading.Event().wait()"]
  inputs: [{fileLocationEnv: INPUT, dataKind: cli-hold-input}]
"""


class Service:
    """``mlynar serve`` as a child process; its log is drained by a thread (so the pipe never
    fills) and watched for the line that names the bound API URL."""

    def __init__(self, data_dir: Path, token_file: Path) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            [*MLYNAR, "serve", "--port", "0", "--data-dir", str(data_dir), "--api-token-file", str(token_file),
             "--log-format", "json", "--log-level", "INFO"],
            cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def _url(self) -> str | None:
        for line in self.lines:
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("message") == "mlynar serving" and record.get("api"):
                    return record["api"]
        return None

    def wait_url(self, timeout: float = 40.0) -> str:
        with self.changed:
            ok = self.changed.wait_for(lambda: self._url() or self.proc.poll() is not None, timeout)
        url = self._url()
        assert ok and url, "mlynar serve did not start:\n" + "".join(self.lines[-40:])
        return url

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The service's URL and the environment a user of it has (``MLYNAR_API``, the token file)."""
    root = tmp_path_factory.mktemp("cli")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    service = Service(root / "data", token_file)
    try:
        url = service.wait_url()
        yield {"MLYNAR_API": url, "MLYNAR_TOKEN_FILE": str(token_file), "ROOT": str(root)}
    finally:
        service.stop()


def cli(env: dict[str, str], *args: str, **extra: str | None) -> subprocess.CompletedProcess[str]:
    """``mlynar ARGS`` as a user with ``MLYNAR_API`` and the token file set (``extra`` variables
    added, or removed when None)."""
    user_env = clean_env(MLYNAR_API=env["MLYNAR_API"], MLYNAR_TOKEN_FILE=env["MLYNAR_TOKEN_FILE"], COLUMNS="200")
    user_env.update({k: v for k, v in extra.items() if v is not None})
    for k in [k for k, v in extra.items() if v is None]:
        user_env.pop(k, None)
    return subprocess.run([*MLYNAR, *args], cwd=REPO, env=user_env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    """A failed command's stderr: exactly one line, starting ``mlynar:``, no traceback."""
    assert p.returncode != 0, p
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlynar: "), p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def applied(api: dict[str, str]) -> dict[str, str]:
    first = cli(api, "apply", "-f", str(EXAMPLES))
    assert first.returncode == 0, first.stderr
    return {"first": first.stdout}


def test_apply_reports_created_then_unchanged(api: dict[str, str], applied: dict[str, str]) -> None:
    first = applied["first"].splitlines()
    assert "datakind/number-array-json created" in first
    assert "operator/average created" in first and "operator/fail created" in first
    assert len(first) == 9 and all(line.endswith(" created") for line in first), first
    second = cli(api, "apply", "-f", str(EXAMPLES))
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    assert len(lines) == 9 and all(line.endswith(" unchanged") for line in lines), lines


def test_apply_skips_foreign_documents_and_reports_a_change(api: dict[str, str], applied: dict[str, str],
                                                            tmp_path: Path) -> None:
    file = tmp_path / "hold.yaml"
    file.write_text(HOLD.replace("DISPLAY", "held"))
    created = cli(api, "apply", "-f", str(file))
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines() == ["datakind/cli-hold-input created", "operator/cli-hold created"]
    assert "(document 1): skipped, Deployment apps/v1" in created.stderr, created.stderr
    file.write_text(HOLD.replace("DISPLAY", "held for a while"))
    changed = cli(api, "apply", "-f", str(file), "-o", "json")
    assert changed.returncode == 0, changed.stderr
    results = {(d["kind"], d["name"]): d["result"] for d in json.loads(changed.stdout)}
    assert results == {("DataKind", "cli-hold-input"): "configured", ("Operator", "cli-hold"): "unchanged"}


def test_submit_the_readme_example_with_watch(api: dict[str, str], applied: dict[str, str], tmp_path: Path) -> None:
    started = time.monotonic()
    p = cli(api, "run", "submit", *README_EXAMPLE, "--watch")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for operator in ("sum", "length", "average"):
        assert re.search(rf"✓ {operator} +success +\d+\.\d\ds", out), out
    assert "3/3 steps" in out and "3 succeeded" in out, out
    run_id = RUN_ID.search(out)[1]  # type: ignore[index]

    got = cli(api, "run", "get", run_id, "-o", "json")
    assert got.returncode == 0, got.stderr
    run = json.loads(got.stdout)
    assert run["status"] == "complete" and run["stepCounts"]["succeeded"] == 3
    assert {s["operator"] for s in run["steps"]} == {"sum", "length", "average"}

    dl = cli(api, "run", "download", run_id, "--kind", "number-array-average-json", "-d", str(tmp_path), "-o", "json")
    assert dl.returncode == 0, dl.stderr
    [written] = json.loads(dl.stdout)
    assert json.loads(Path(written["path"]).read_text()) == {"average": 10}
    assert Path(written["path"]).parent == tmp_path / "number-array-average-json"

    history = cli(api, "history", run_id, "-o", "json")
    assert history.returncode == 0, history.stderr
    events = json.loads(history.stdout)["events"]
    assert [e["type"] for e in events][0] == "RunCreated" and events[-1]["type"] == "RunCompleted"
    started_at = next(e["sequence"] for e in events if e["type"] == "RunStarted")
    at = cli(api, "history", run_id, "--at", str(started_at), "-o", "json")
    assert at.returncode == 0, at.stderr
    then = json.loads(at.stdout)
    assert then["status"] == "running" and then["version"] == started_at and then["steps"] == []
    table = cli(api, "history", run_id)
    assert table.returncode == 0, table.stderr
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3} +\d+ +solver +RunCompleted", table.stdout), table.stdout
    assert re.search(r"StepStarted +average \(step [0-9a-f]{8}\) attempt 1 on machine:local", table.stdout)
    assert time.monotonic() - started < 45


def test_a_failing_step_exits_non_zero_with_its_log(api: dict[str, str], applied: dict[str, str]) -> None:
    p = cli(api, "run", "submit", "--upload", f"fail-input={EXAMPLES / 'data' / 'numbers.json'}", "--watch")
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(r"✗ fail +failure", p.stdout), p.stdout
    assert "│ fail: refusing to process" in p.stdout, p.stdout  # the first lines of its log
    assert "1 failed" in p.stdout
    run_id = RUN_ID.search(p.stdout)[1]  # type: ignore[index]
    logs = cli(api, "run", "logs", run_id, "fail")
    assert logs.returncode == 0 and "fail: refusing to process" in logs.stdout, logs.stderr
    deleted = cli(api, "run", "delete", run_id)
    assert deleted.returncode == 0 and f"run {run_id} deleted" in deleted.stdout, deleted.stderr
    again = cli(api, "delete", "run", run_id)
    assert again.returncode == 4 and "does not exist (HTTP 404)" in one_line_error(again)


def _read_until(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    """The child's stdout up to the line containing ``text`` (waiting on the pipe, with a deadline)."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(left), f"no {text!r} in time; got {seen!r}"
            line = proc.stdout.readline()
            assert line, f"the watcher ended before {text!r}: {seen!r} {proc.stderr.read() if proc.stderr else ''}"
            seen += line
    return seen


@pytest.fixture(scope="module")
def hold_operator(api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """The operator ``cli-hold``: its step runs until it is cancelled."""
    file = tmp_path_factory.mktemp("hold") / "hold.yaml"
    file.write_text(HOLD.replace("DISPLAY", "held"))
    assert cli(api, "apply", "-f", str(file)).returncode == 0


def held_run(api: dict[str, str], tmp_path: Path) -> str:
    """A submitted run (not watched) whose one step holds."""
    data = tmp_path / "x.txt"
    data.write_text("x")
    submitted = cli(api, "run", "submit", "--upload", f"cli-hold-input={data}", "-o", "json")
    assert submitted.returncode == 0, submitted.stderr
    return json.loads(submitted.stdout)["id"]


def test_ctrl_c_stops_watching_not_the_run_and_terminate_exits_3(api: dict[str, str], hold_operator: None,
                                                                   tmp_path: Path) -> None:
    run_id = held_run(api, tmp_path)

    env = clean_env(MLYNAR_API=api["MLYNAR_API"], MLYNAR_TOKEN_FILE=api["MLYNAR_TOKEN_FILE"])
    watcher = subprocess.Popen([*MLYNAR, "run", "watch", run_id], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _read_until(watcher, "watching run", 30)
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 130, err
    assert f"run {run_id} goes on" in err and "Traceback" not in err, err
    assert json.loads(cli(api, "run", "get", run_id, "-o", "json").stdout)["status"] == "running"

    terminated = cli(api, "run", "terminate", run_id, "--cancel")
    assert terminated.returncode == 0 and "terminated" in terminated.stdout, terminated.stderr
    watched = cli(api, "run", "watch", run_id)
    assert watched.returncode == 3, watched.stdout + watched.stderr
    assert "terminated" in watched.stdout and "cancelled" in watched.stdout, watched.stdout


def upload(api: dict[str, str], run_id: str, kind: str, content: bytes) -> None:
    """One multipart upload straight to the API (what ``curl -F file=@…`` sends)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"more.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{api['MLYNAR_API']}/api/run/{run_id}/upload/{kind}", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                              "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 201


def test_a_dropped_event_stream_is_resumed_from_the_last_event(api: dict[str, str], applied: dict[str, str],
                                                                hold_operator: None, tmp_path: Path) -> None:
    run_id = held_run(api, tmp_path)
    proxy = CuttingProxy(api["MLYNAR_API"])
    env = clean_env(MLYNAR_API=proxy.url, MLYNAR_TOKEN_FILE=api["MLYNAR_TOKEN_FILE"])
    watcher = subprocess.Popen([*MLYNAR, "run", "watch", run_id], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proxy.wait(lambda: proxy.resumed_from(), "the watcher to open the event stream")
        # a second, failing step: the watcher prints it once it has applied its last event, after
        # which nothing happens until the terminate below (the first step holds)
        upload(api, run_id, "fail-input", b"y")
        seen = _read_until(watcher, "✗ fail", 30)
        last = int(re.findall(rb"^id: (\d+)", bytes(proxy.down), re.M)[-1])
        proxy.cut()
        proxy.wait(lambda: len(proxy.resumed_from()) >= 2, "the watcher to reconnect")
        assert proxy.resumed_from()[1] == last > proxy.resumed_from()[0]  # right after the last event it had
        assert cli(api, "run", "terminate", run_id, "--cancel").returncode == 0
        out, err = watcher.communicate(timeout=40)
        out = seen + out
    finally:
        if watcher.poll() is None:
            watcher.kill()
        proxy.close()
    assert watcher.returncode == 3, out + err
    # each step once: nothing missed, nothing twice
    assert len(re.findall(r"✗ fail +failure", out)) == 1 and len(re.findall(r"○ cli-hold +cancelled", out)) == 1, out


def test_errors_are_one_line_with_the_api_message(api: dict[str, str], applied: dict[str, str]) -> None:
    wrong = cli(api, "get", "runs", MLYNAR_TOKEN="not-the-token", MLYNAR_TOKEN_FILE=None)
    assert wrong.returncode == 5
    assert one_line_error(wrong) == "mlynar: invalid bearer token (HTTP 403)"

    unknown = str(uuid.uuid4())
    missing = cli(api, "run", "get", unknown)
    assert missing.returncode == 4
    assert one_line_error(missing) == f"mlynar: run {unknown!r} does not exist (HTTP 404)"

    nowhere = cli(api, "get", "kinds", "--api", "http://127.0.0.1:9")
    assert nowhere.returncode == 6
    assert "cannot reach the API at http://127.0.0.1:9" in one_line_error(nowhere)

    bad = cli(api, "run", "submit", "--param", "sum=5")
    assert bad.returncode == 2 and "expected OPERATOR.NAME=VALUE" in one_line_error(bad)


def test_lists_as_json(api: dict[str, str], applied: dict[str, str]) -> None:
    ops = cli(api, "get", "operators", "-o", "json")
    assert ops.returncode == 0, ops.stderr
    assert {"sum", "length", "average", "fail"} <= {o["metadata"]["name"] for o in json.loads(ops.stdout)}
    machines = cli(api, "get", "machines")
    assert machines.returncode == 0 and re.search(r"^local +http://127\.0\.0\.1:\d+", machines.stdout, re.M)


def test_tokens_create_list_revoke(api: dict[str, str], applied: dict[str, str]) -> None:
    """An admin gives alice a member token with the CLI; alice works with it, cannot declare
    operators, and is refused once it is revoked."""
    created = cli(api, "tokens", "create", "alice", "--role", "member", "--description", "laptop")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("mlt_")
    listed = json.loads(cli(api, "tokens", "list", "-o", "json").stdout)
    mine = [t for t in listed if t["principal"] == "alice"]
    assert len(mine) == 1 and mine[0]["role"] == "member" and token not in json.dumps(listed)
    table = cli(api, "tokens", "list").stdout
    assert re.search(rf"^{mine[0]['id']} +alice +member +laptop +admin", table, re.M), table

    as_alice = {"MLYNAR_TOKEN": token, "MLYNAR_TOKEN_FILE": None}
    assert cli(api, "get", "runs", **as_alice).returncode == 0
    refused = cli(api, "apply", "-f", str(EXAMPLES), **as_alice)
    assert "it needs the admin role" in refused.stderr, refused.stderr

    revoked = cli(api, "tokens", "revoke", mine[0]["id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    after = cli(api, "get", "runs", **as_alice)
    assert one_line_error(after) == "mlynar: invalid bearer token (HTTP 403)"
