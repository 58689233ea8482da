"""The machine backend: runs a step on a registered machine's agent over HTTP.

Inputs stream from the blob store to the agent, outputs and logs stream back to local files;
nothing is held whole in memory. Machines (URL, token reference) are followed from the
``mlynar.machine.>`` events; tokens come from the secret store at the moment they are needed.

An attempt is the agent step ``<step id>-<attempt>``. ``run`` first asks the agent for it and
attaches to whatever exists (queued, running or finished: a redelivered step collects it, it is
not sent again); only an unknown one is PUT. It never deletes a finished attempt: ``release``
does, after the worker appended the outcome. Before attempt N starts, attempt N-1 is made sure to
be gone from the agent, so an agent that was only unreachable never runs two attempts of a step.
No answer or a 5xx from the agent, an agent that reports the attempt ``lost`` (it restarted), or
a blob store that cannot be read make the result ``lost``: the infrastructure's failure."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, replace

import aiohttp

from mlynar_events.blobs import BlobNotFound, BlobStore
from mlynar_events.events import MachineDeleted, MachineRegistered, MachineUpdated, StepScheduled, subject_filters
from mlynar_events.principals import machine_refusal, may_use_machine
from mlynar_events.secrets import SecretStore
from mlynar_events.store import EventStore

from .agent.models import StepStatus
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
    owner: str | None = None
    shared_with: tuple[str, ...] = ()


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
                    self.machines[event.name] = Machine(event.name, event.url, event.token_ref, event.owner,
                                                        tuple(event.shared_with))
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
                 *, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 hosted: dict[str, Machine] | None = None) -> None:
        """``hosted``: machines this process runs itself (the built-in ``local``). Their steps go
        to this process's own agent whatever the registry says: every replica registers its own
        ``local``, and the last one to start must not receive (and, when it dies, lose) the
        steps of all the others."""
        self.hosted = dict(hosted or {})
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

    async def _client(self, name: str) -> tuple[Machine | None, AgentClient | None]:
        registered = await self.directory.get(name)
        machine = self.hosted.get(name) or registered
        if machine is None:
            return None, None
        if registered is not None:  # who may use it is the registry's, also for a hosted machine
            machine = replace(machine, owner=registered.owner, shared_with=registered.shared_with)
        token = await self.secrets.get(machine.token_ref) if machine.token_ref else None
        return machine, AgentClient(machine.url, token, connect_timeout=self.connect_timeout,
                                    read_timeout=self.read_timeout, session=self.session())

    async def run(self, attempt: Attempt) -> AttemptResult:
        name = attempt.step.spec.machine or ""
        machine, client = await self._client(name)
        if machine is None or client is None:
            return AttemptResult(ok=False, error=f"machine {name!r} is not registered", retryable=True)
        if not may_use_machine(attempt.step.owner, machine.owner, machine.shared_with):
            # not the operator's failure and no retry can change it: the step fails with the reason
            return AttemptResult(ok=False, retryable=False, error=machine_refusal(name, attempt.step.owner, machine.owner))
        async with client:
            try:
                return await self._run(client, attempt)
            except AgentError as exc:
                # no answer, or the agent failing (5xx): the infrastructure, not the operator
                lost = exc.status is None or exc.status >= 500
                return AttemptResult(ok=False, lost=lost, error=f"machine {name!r} at {machine.url}: {exc}")
            except BlobNotFound as exc:
                return AttemptResult(ok=False, retryable=False, error=f"an input's bytes are gone from the blob store: {exc}")
            except OSError as exc:  # the blob store or the executor's disk
                return AttemptResult(ok=False, lost=True, error=f"cannot read the step's inputs: {exc}")

    async def release(self, attempt: Attempt, *, failed: bool) -> None:
        """``DELETE`` the attempt's step on the agent (its sandbox and outputs go with it)."""
        name = attempt.step.spec.machine or ""
        ctx = {"run_id": attempt.step.run_id, "step_id": attempt.step.step_id, "external_id": attempt.external_id}
        machine, client = await self._client(name)
        if client is None:
            return
        async with client:
            try:
                await _gone(client, attempt.external_id)
            except AgentError as exc:
                log.warning("could not release the attempt on its agent; it keeps it until its --result-ttl",
                            extra={**ctx, "error": str(exc)})

    async def _run(self, client: AgentClient, a: Attempt) -> AttemptResult:
        step, sid = a.step, a.external_id
        if a.attempt > 1:
            # The attempt before this one must be gone from the agent before this one starts: an
            # agent that was unreachable may still be running it (each attempt removes its
            # predecessor, so at most one of a step's attempts exists on an agent).
            await _gone(client, self.external_id(step, a.attempt - 1))
        status = await self._start_or_attach(client, a)
        if not status.terminal:
            status = await self._wait(client, sid, a)
        logs = a.workdir / "logs.txt"
        try:
            await _with_retries(lambda: client.download_logs(sid, logs))
        except AgentError:
            logs = None  # type: ignore[assignment]
        if status is None:  # cancelled: removing the step is what kills it
            await _quietly(client.delete_step(sid))
            return AttemptResult(ok=False, error="cancelled", logs=logs, cancelled=True)
        if status.state != "succeeded":
            error = status.error or f"step {status.state}"
            # the agent says whether the same step would fail the same way (e.g. refused by
            # --allow) and whether the attempt was lost to the agent rather than failed
            return AttemptResult(ok=False, error=error, logs=logs, retryable=status.retryable, lost=status.lost)
        outputs = []
        for out in status.outputs:
            dest = a.workdir / "outputs" / str(out.index)
            await _with_retries(lambda: client.download_output(sid, out.index, dest, expected_sha256=out.sha256))
            outputs.append(Output(out.data_kind, dest, out.file.rsplit("/", 1)[-1]))
        return AttemptResult(ok=True, outputs=outputs, logs=logs)

    async def _start_or_attach(self, client: AgentClient, a: Attempt) -> StepStatus:
        """The attempt's status on the agent: the one that exists (running, queued or finished:
        a redelivered step re-attaches, its inputs are not sent again), else a new one PUT with
        its inputs. A PUT of the same id and manifest is idempotent on the agent too, so a race
        with another executor re-attaching the same attempt starts nothing twice."""
        step, sid = a.step, a.external_id
        existing = await _status_or_none(client, sid)
        if existing is not None:
            log.info("attempt exists on the agent; attaching",
                     extra={"run_id": step.run_id, "step_id": step.step_id, "external_id": sid, "state": existing.state})
            return existing
        await a.check_open()  # not released after its outcome by another executor meanwhile
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
        try:
            return StepStatus.model_validate(await _with_retries(lambda: client.put_step(sid, manifest, inputs)))
        except AgentError as exc:
            if exc.status == 409:  # another executor is uploading this very attempt: attach to it
                again = await _status_or_none(client, sid)
                if again is not None:
                    return again
            raise

    async def _wait(self, client: AgentClient, sid: str, a: Attempt) -> StepStatus | None:
        """Long-poll the agent until the step ends (its typed status); ``None`` if cancelled meanwhile."""
        while True:
            poll = asyncio.ensure_future(_with_retries(lambda: client.status(sid, wait=WAIT)))
            cancel = asyncio.ensure_future(a.cancelled.wait())
            done, _ = await asyncio.wait({poll, cancel}, return_when=asyncio.FIRST_COMPLETED)
            if cancel in done:
                poll.cancel()
                return None
            cancel.cancel()
            status = StepStatus.model_validate(poll.result())
            if status.terminal:
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


async def _status_or_none(client: AgentClient, sid: str) -> StepStatus | None:
    try:
        return StepStatus.model_validate(await _with_retries(lambda: client.status(sid)))
    except AgentError as exc:
        if exc.status == 404:
            return None
        raise


async def _gone(client: AgentClient, sid: str) -> None:
    """Make sure step ``sid`` is not on the agent (deleted now, or unknown already)."""
    try:
        await _with_retries(lambda: client.delete_step(sid))
    except AgentError as exc:
        if exc.status != 404:
            raise


async def _quietly(coro) -> None:  # type: ignore[no-untyped-def]
    try:
        await coro
    except AgentError:
        pass
