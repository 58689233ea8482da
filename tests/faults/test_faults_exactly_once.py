"""Nothing run twice when the outcome cannot be written (finding 3 of the fault probe).

Split roles as separate processes (API + projector + solver, a machine agent, executors) on a
real nats-server. Six steps run on the agent, blocked on a gate, each having appended one line to
an execution ledger. Then the nats-server is SIGKILLed, the gate opened: the agent finishes every
step and the executor downloads the outputs but cannot append them. That executor is SIGKILLed,
NATS restarted, a second executor started: it re-attaches to the finished attempts the agent
still holds (they are released only after their outcome is appended) and records them. Before
this, the first executor had DELETEd each step right after the download, and the redelivered
step ran again (8 duplicates in the probe)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from executors.machine_client import AgentClient, AgentError
from mlynar_events.nats_server import EmbeddedNats
from support import Api, wait_until
from test_execution import MLYNAR, Proc, _agent_url, data_kind, declare, logged, operator, serving_url, start

from conftest import ledger_lines, ledger_operator

ITEMS = [str(n) for n in range(6)]
TOKEN = "agent-secret-token"


async def test_outputs_downloaded_but_not_recorded_are_collected_not_run_again(tmp_path: Path, recovery: Any) -> None:
    import aiohttp

    nats = EmbeddedNats(tmp_path / "nats")
    url = await nats.start()
    started: list[Proc] = []
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    def spawn(name: str, *args: str) -> Proc:
        p = Proc(name, [*MLYNAR, *args], log_dir).start()
        started.append(p)
        return p

    try:
        blobs = tmp_path / "blobs"
        common = ["--nats-url", url, "--no-local-machine", "--blob-dir", str(blobs), "--log-format", "json",
                  "--log-level", "INFO"]
        api_proc = spawn("api", "serve", "--roles", "api,projector,solver", "--port", "0",
                         "--data-dir", str(tmp_path / "api-data"), *common)
        (tmp_path / "agent-token").write_text(TOKEN + "\n")
        agent = spawn("agent", "machine-agent", "--host", "127.0.0.1", "--port", "0",
                      "--token-file", str(tmp_path / "agent-token"), "--work-dir", str(tmp_path / "agent-work"),
                      "--isolation", "none", "--run-as-user=", "--max-parallel", str(len(ITEMS)))
        executor_args = ["serve", "--roles", "executor", "--executor-ack-wait", "2", *common]
        first = spawn("executor-1", *executor_args, "--data-dir", str(tmp_path / "exec-1"))
        api_url = await api_proc.wait_log(serving_url, "API listening")
        agent_url = await agent.wait_log(lambda p: _agent_url(p.text()), "agent listening")
        await first.wait_log(logged("executor started"), "executor started")

        ledger, gate = tmp_path / "ledger.txt", tmp_path / "gate"
        async with aiohttp.ClientSession(api_url) as http:
            api = Api(http, None)
            status, body = await api.call("POST", "/api/machines", json={"name": "remote", "url": agent_url, "token": TOKEN})
            assert status == 201, body
            await declare(api, data_kind("item"), data_kind("result"),
                          operator("once", ledger_operator(tmp_path), machine="remote", inputs=[("ITEM", "item")],
                                   outputs=["result"], env={"LEDGER": str(ledger), "GATE": str(gate)}))
            run_id = await api.create_run()
            for item in ITEMS:
                assert (await api.upload(run_id, "item", item.encode()))[0] == 201
            await start(api, run_id, f"?maxParallel={len(ITEMS)}")
            await wait_until(lambda: _true(len(ledger_lines(ledger)) == len(ITEMS)), timeout=30,
                             what="every step running on the agent")

            nats.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            await nats.proc.wait()  # type: ignore[union-attr]
            gate.touch()
            downloaded = tmp_path / "exec-1" / "executor"
            await wait_until(lambda: _true(len(list(downloaded.glob("*/outputs/0"))) == len(ITEMS)), timeout=30,
                             what="the first executor holding every step's downloaded output")
            first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            first.proc.wait(10)  # type: ignore[union-attr]

            nats = EmbeddedNats(tmp_path / "nats", port=nats.port)
            await nats.start()
            restarted = time.monotonic()
            spawn("executor-2", *executor_args, "--data-dir", str(tmp_path / "exec-2"))
            run = await api.wait_status(run_id, "complete", timeout=60)
            took = time.monotonic() - restarted

            assert sorted((s["status"], s["attempt"]) for s in run["steps"]) == [("success", 1)] * len(ITEMS)
            ran = sorted(line.split()[0] for line in ledger_lines(ledger))
            assert ran == ITEMS, f"executions per input: {ran}"
            results = sorted([(await api.content(u["url"])).decode() for u in run["dataPool"] if u["dataKind"] == "result"])
            assert results == sorted(f"done {i}" for i in ITEMS)
            # released on the agent now that their outcome is recorded
            async with AgentClient(agent_url, TOKEN) as client:
                for s in run["steps"]:
                    try:
                        await client.status(f"{s['id']}-1")
                        raise AssertionError(f"attempt {s['id']}-1 is still on the agent")
                    except AgentError as exc:
                        assert exc.status == 404, exc
        recovery.record("embedded NATS SIGKILLed after the agent finished, then the executor", took,
                        what="the run complete after NATS came back", executions=len(ran), input_sets=len(ITEMS))
    finally:
        for p in reversed(started):
            p.stop()
        await nats.stop()


async def _true(value: Any) -> Any:
    return value
