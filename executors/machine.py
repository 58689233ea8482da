"""The machine backend: runs a step on a registered machine's agent over HTTP.

Inputs stream from the blob store to the agent, outputs and logs stream back to local files;
nothing is held whole in memory. Machines (URL, token reference) are followed from the
``mlynar.machine.>`` events; tokens come from the secret store at the moment they are needed."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import aiohttp

from mlynar_events.blobs import BlobStore
from mlynar_events.events import MachineDeleted, MachineRegistered, MachineUpdated, StepScheduled, subject_filters
from mlynar_events.secrets import SecretStore
from mlynar_events.store import EventStore

from .agent.models import TERMINAL_STATES, StepStatus
from .backend import Attempt, AttemptResult, Output
from .machine_client import AgentClient, AgentError

log = logging.getLogger("mlynar.executor.machine")

WAIT = 30.0  # long-poll slice
CONNECT_TRIES = 4


@dataclass(frozen=True)
class Machine:
    name: str
    url: str
    token_ref: str | None


class MachineDirectory:
    """The registered machines, folded from their events and kept up to date."""

    CONSUMES = (MachineRegistered, MachineUpdated, MachineDeleted)

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.machines: dict[str, Machine] = {}
        self.ready = asyncio.Event()

    async def run(self) -> None:
        sub = await self.store.subscribe(subject_filters(self.CONSUMES))
        if sub.start_head == 0:
            self.ready.set()
        try:
            async for stored in sub:
                event = stored.event
                if isinstance(event, MachineRegistered):  # also MachineUpdated
                    self.machines[event.name] = Machine(event.name, event.url, event.token_ref)
                elif isinstance(event, MachineDeleted):
                    self.machines.pop(event.name, None)
                if sub.pending == 0:
                    self.ready.set()
        finally:
            await sub.close()

    async def get(self, name: str, timeout: float = 10.0) -> Machine | None:
        await asyncio.wait_for(self.ready.wait(), timeout)
        return self.machines.get(name)


class MachineBackend:
    def __init__(self, directory: MachineDirectory, secrets: SecretStore, blobs: BlobStore,
                 *, connect_timeout: float = 10.0, read_timeout: float = 60.0) -> None:
        self.directory = directory
        self.secrets = secrets
        self.blobs = blobs
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None  # shared: keep-alive connections to agents

    def target(self, step: StepScheduled) -> str:
        return f"machine:{step.spec.machine}"

    def external_id(self, step: StepScheduled, attempt: int) -> str:
        return f"{step.step_id}-{attempt}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                version=aiohttp.HttpVersion11, raise_for_status=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_read=self.read_timeout))
        return self._session

    async def run(self, attempt: Attempt) -> AttemptResult:
        step = attempt.step
        name = step.spec.machine or ""
        machine = await self.directory.get(name)
        if machine is None:
            return AttemptResult(ok=False, error=f"machine {name!r} is not registered", retryable=True)
        token = await self.secrets.get(machine.token_ref) if machine.token_ref else None
        async with AgentClient(machine.url, token, connect_timeout=self.connect_timeout,
                               read_timeout=self.read_timeout, session=self.session()) as client:
            try:
                return await self._run(client, attempt)
            except AgentError as exc:
                return AttemptResult(ok=False, error=f"machine {name!r} at {machine.url}: {exc}")

    async def _run(self, client: AgentClient, a: Attempt) -> AttemptResult:
        step, sid = a.step, a.external_id
        inputs_dir = a.workdir / "inputs"
        inputs = {}
        for i, inp in enumerate(step.inputs):
            path = inputs_dir / f"in{i}" / inp.filename
            await self.blobs.get_to_file(inp.blob, path)
            inputs[f"in{i}"] = path
        manifest = {
            "command": step.spec.command,
            "env": step.env,
            "inputs": [{"name": f"in{i}", "filename": inp.filename, "env": inp.env} for i, inp in enumerate(step.inputs)],
            "timeoutSeconds": step.spec.timeoutSeconds,
        }
        await _with_retries(lambda: client.put_step(sid, manifest, inputs))
        answer = await self._wait(client, sid, a)
        status = None if answer is None else StepStatus.model_validate(answer)
        logs = a.workdir / "logs.txt"
        try:
            await _with_retries(lambda: client.download_logs(sid, logs))
        except AgentError:
            logs = None  # type: ignore[assignment]
        if status is None:  # cancelled
            await _quietly(client.delete_step(sid))
            return AttemptResult(ok=False, error="cancelled", logs=logs, cancelled=True)
        if status.state != "succeeded":
            await _quietly(client.delete_step(sid))
            error = status.error or f"step {status.state}"
            # the agent says whether the same step would fail the same way (e.g. refused by --allow)
            return AttemptResult(ok=False, error=error, logs=logs, retryable=status.retryable)
        outputs = []
        for out in status.outputs:
            dest = a.workdir / "outputs" / str(out.index)
            await _with_retries(lambda: client.download_output(sid, out.index, dest, expected_sha256=out.sha256))
            outputs.append(Output(out.data_kind, dest, out.file.rsplit("/", 1)[-1]))
        await _quietly(client.delete_step(sid))
        return AttemptResult(ok=True, outputs=outputs, logs=logs)

    async def _wait(self, client: AgentClient, sid: str, a: Attempt) -> dict | None:
        """Long-poll the agent until the step ends; ``None`` if cancelled meanwhile."""
        while True:
            poll = asyncio.ensure_future(_with_retries(lambda: client.status(sid, wait=WAIT)))
            cancel = asyncio.ensure_future(a.cancelled.wait())
            done, _ = await asyncio.wait({poll, cancel}, return_when=asyncio.FIRST_COMPLETED)
            if cancel in done:
                poll.cancel()
                return None
            cancel.cancel()
            status = poll.result()
            if status["state"] in TERMINAL_STATES:
                return status


async def _with_retries(call, tries: int = CONNECT_TRIES):  # type: ignore[no-untyped-def]
    """Connection-level retries with exponential backoff and jitter; HTTP errors that the agent
    answered (4xx) are not retried."""
    for n in range(tries):
        try:
            return await call()
        except AgentError as exc:
            if (exc.status is not None and exc.status < 500) or n == tries - 1:
                raise
            delay = min(0.25 * 2**n, 4.0) * (0.5 + random.random())
            log.warning("agent call failed; retrying", extra={"error": str(exc), "retry_in": round(delay, 2)})
            await asyncio.sleep(delay)


async def _quietly(coro) -> None:  # type: ignore[no-untyped-def]
    try:
        await coro
    except AgentError:
        pass
