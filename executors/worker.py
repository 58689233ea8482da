"""The step worker: takes ``StepScheduled`` from a durable pull consumer shared by every
executor, runs each step's attempts on its backend and appends what happened.

* at-least-once delivery, exactly-once effects: every event it appends has an id derived from the
  fact (step, attempt, output index), and a redelivered step whose attempt had started re-attaches
  to the same external id (agent step id, Job name) instead of starting it again;
* ``in_progress`` heartbeats keep a long step from being redelivered while its executor lives;
* retries with exponential backoff and jitter per ``spec.retries``; ``spec.timeoutSeconds`` is
  enforced by the backend (the agent kills the process group, Kubernetes the Job);
* cancellation follows ``RunTerminationRequested(cancel=true)`` on the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

from nats.js import api as js_api
from nats.js.errors import APIError

from mlynar_events.blobs import BlobStore, logs_key, unit_key
from mlynar_events.events import (
    STREAM, DataUnitAdded, Event, RunDeleted, RunTerminationRequested, StepAttemptFailed, StepCancelled,
    StepFailed, StepScheduled, StepStarted, StepSucceeded, subject_filters,
)
from mlynar_events.outputs import OutputManifestError, check_kinds
from mlynar_events.runstate import RunState, RunStateCache
from mlynar_events.store import EventStore, decode
from mlynar_events.tasks import cancel_and_wait

from .backend import Attempt, AttemptResult, Backend

log = logging.getLogger("mlynar.executor")

DURABLE = "executors"
OUTPUT_NAMESPACE = uuid.UUID("5b0f1f6e-8f5e-4a7a-9a43-6d1f8e0c2a11")


def output_unit_id(step_id: str, index: int) -> str:
    return str(uuid.uuid5(OUTPUT_NAMESPACE, f"{step_id}/{index}"))


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential with full jitter in [50 %, 150 %]."""
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random())


class StepWorker:
    SCHEDULES = (StepScheduled,)
    """What the shared durable consumer delivers: the steps to run."""
    CANCELS = (RunTerminationRequested, RunDeleted)
    """What the cancellation follower watches, from the head on."""
    CONSUMES = SCHEDULES + CANCELS

    def __init__(
        self,
        store: EventStore,
        blobs: BlobStore,
        backends: dict[str, Backend],
        *,
        concurrency: int = 16,
        ack_wait: float = 30.0,
        retry_base: float = 1.0,
        workdir: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.backends = backends  # "machine" / "kubernetes"
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.retry_base = retry_base
        self.workdir = workdir or Path(tempfile.gettempdir()) / "mlynar-executor"
        self.name = name or f"executor:{socket.gethostname()}:{uuid.uuid4().hex[:6]}"
        self.running: dict[str, Attempt] = {}  # step_id -> current attempt
        self.active = 0  # messages being handled
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._runs = RunStateCache(store)

    # ---- consumer ---------------------------------------------------------------------------

    async def ensure_consumer(self) -> None:
        config = js_api.ConsumerConfig(
            durable_name=DURABLE,
            filter_subject=subject_filters(self.SCHEDULES)[0],
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=10_000,
            deliver_policy=js_api.DeliverPolicy.ALL,
        )
        try:
            await self.store.js.add_consumer(STREAM, config)
        except APIError as exc:
            if exc.err_code != 10148:  # exists with another config: update it
                raise
            await self.store.js.add_consumer(STREAM, config)

    async def run(self) -> None:
        await self.ensure_consumer()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cancels = asyncio.create_task(self._follow_cancellations(), name="executor-cancellations")
        psub = await self.store.js.pull_subscribe_bind(DURABLE, stream=STREAM)
        log.info("executor started", extra={"executor": self.name, "concurrency": self.concurrency})
        try:
            while True:
                while self.active >= self.concurrency:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                if cancels.done():  # without it a cancel would never reach a running step
                    raise RuntimeError("the executor's cancellation follower stopped") from (
                        None if cancels.cancelled() else cancels.exception())
                try:
                    msgs = await psub.fetch(batch=self.concurrency - self.active, timeout=5.0)
                except asyncio.TimeoutError:
                    continue
                for msg in msgs:
                    self.active += 1
                    task = asyncio.create_task(self._handle(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            # Stop pulling first: a pull request still open on the server would take the steps
            # handed back below and hold them, unacknowledged, for the whole ack_wait.
            with contextlib.suppress(Exception):  # the connection may be draining already
                await psub.unsubscribe()
            await cancel_and_wait([cancels, *self._tasks])

    async def _handle(self, msg) -> None:  # type: ignore[no-untyped-def]
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            stored = decode(msg)
            if stored is not None and isinstance(stored.event, StepScheduled):
                await self.execute(stored.event)
            await msg.ack()
        except asyncio.CancelledError:
            # Draining on shutdown: hand the step back at once (a nak without delay) instead of
            # leaving it to ack_wait, so another executor takes it now. What this one started is
            # left running where it runs (agent step, Job) and is re-attached by the next one.
            log.info("handing the step back on shutdown", extra={"subject": msg.subject})
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise
        except Exception:
            log.exception("step handling failed; it will be redelivered", extra={"subject": msg.subject})
            try:
                await msg.nak(delay=5.0)
            except Exception:
                pass
        finally:
            heartbeat.cancel()
            self.active -= 1
            self._slot_freed.set()

    async def _heartbeat(self, msg) -> None:  # type: ignore[no-untyped-def]
        while True:
            await asyncio.sleep(max(self.ack_wait / 3, 0.2))
            try:
                await msg.in_progress()
            except Exception:
                pass

    async def _follow_cancellations(self) -> None:
        sub = await self.store.subscribe(subject_filters(self.CANCELS),
                                         await self.store.last_seq() + 1)
        try:
            async for stored in sub:
                event = stored.event
                if (isinstance(event, RunTerminationRequested) and event.cancel) or isinstance(event, RunDeleted):
                    for attempt in list(self.running.values()):
                        if attempt.step.run_id == event.run_id:
                            log.info("cancelling step", extra={"run_id": event.run_id, "step_id": attempt.step.step_id})
                            attempt.cancelled.set()
        finally:
            await sub.close()

    # ---- one step ---------------------------------------------------------------------------

    async def _run_state(self, run_id: str) -> RunState:
        return await self._runs.get(run_id)

    async def _append(self, event: Event, msg_id: str) -> None:
        await self.store.append(event, actor=self.name, msg_id=msg_id)

    async def execute(self, step: StepScheduled) -> None:
        state = await self._run_state(step.run_id)
        current = state.steps.get(step.step_id)
        ctx = {"run_id": step.run_id, "step_id": step.step_id, "operator": step.operator}
        if not state.exists or current is None or current.finished:
            log.info("step needs nothing more", extra=ctx)
            return
        if state.termination is not None and state.termination.cancel:
            await self._append(StepCancelled(run_id=step.run_id, step_id=step.step_id, reason="run terminated"),
                               f"{step.step_id}:cancelled")
            return
        kind = "machine" if step.spec.machine else "kubernetes"
        backend = self.backends.get(kind)
        if backend is None:
            await self._append(StepFailed(run_id=step.run_id, step_id=step.step_id, attempt=max(current.attempt, 1),
                                          error=f"no {kind} executor is configured in this service"),
                               f"{step.step_id}:failed")
            return
        attempt_no = max(current.attempt, 1)  # a started attempt is re-attached, not restarted
        while True:
            attempt = Attempt(step, attempt_no, backend.external_id(step, attempt_no),
                              self.workdir / backend.external_id(step, attempt_no))
            try:
                result = await self._attempt(backend, attempt, reattach=current.attempt == attempt_no)
                if not (await self._run_state(step.run_id)).exists:
                    log.info("run deleted while its step ran; keeping nothing", extra=ctx)
                    return
                logs = await self._store_logs(step, attempt_no, result)
                if result.ok:
                    result = await self._outputs(step, attempt_no, result, logs)
            finally:
                shutil.rmtree(attempt.workdir, ignore_errors=True)
            if result.ok:
                return
            if result.cancelled:
                await self._append(StepCancelled(run_id=step.run_id, step_id=step.step_id, reason="cancelled by user",
                                                 attempt=attempt_no, logs_blob=logs),
                                   f"{step.step_id}:cancelled")
                return
            retries_left = step.spec.retries - (attempt_no - 1)
            if retries_left <= 0 or not result.retryable:
                await self._append(StepFailed(run_id=step.run_id, step_id=step.step_id, attempt=attempt_no,
                                              error=result.error or "failed", logs_blob=logs),
                                   f"{step.step_id}:failed")
                log.warning("step failed", extra={**ctx, "attempt": attempt_no, "error": result.error})
                return
            delay = backoff(attempt_no, self.retry_base)
            await self._append(StepAttemptFailed(run_id=step.run_id, step_id=step.step_id, attempt=attempt_no,
                                                 error=result.error or "failed", logs_blob=logs, retry_in=round(delay, 3)),
                               f"{step.step_id}:attempt-failed:{attempt_no}")
            log.info("attempt failed; retrying", extra={**ctx, "attempt": attempt_no, "retry_in": round(delay, 2),
                                                         "error": result.error})
            await asyncio.sleep(delay)
            attempt_no += 1

    async def _attempt(self, backend: Backend, attempt: Attempt, reattach: bool) -> AttemptResult:
        step = attempt.step
        await self._append(StepStarted(run_id=step.run_id, step_id=step.step_id, attempt=attempt.attempt,
                                       executor=self.name, target=backend.target(step), external_id=attempt.external_id),
                           f"{step.step_id}:started:{attempt.attempt}")
        log.info("re-attaching step" if reattach else "starting step",
                 extra={"run_id": step.run_id, "step_id": step.step_id, "attempt": attempt.attempt,
                        "external_id": attempt.external_id})
        shutil.rmtree(attempt.workdir, ignore_errors=True)
        attempt.workdir.mkdir(parents=True)
        self.running[step.step_id] = attempt
        try:
            return await backend.run(attempt)
        except Exception as exc:  # a backend bug or an unexpected answer: fail the attempt, keep the worker
            log.exception("backend error", extra={"step_id": step.step_id})
            return AttemptResult(ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            self.running.pop(step.step_id, None)

    async def _store_logs(self, step: StepScheduled, attempt_no: int, result: AttemptResult) -> str | None:
        if result.logs is None or not result.logs.exists():
            return None
        key = logs_key(step.run_id, step.step_id, attempt_no)
        await self.blobs.put_file(key, result.logs)
        return key

    async def _outputs(self, step: StepScheduled, attempt_no: int, result: AttemptResult, logs: str | None) -> AttemptResult:
        """Check the outputs against the operator, store them, append them and the success
        (the run was seen to exist after the attempt ended)."""
        try:
            check_kinds((o.data_kind for o in result.outputs), step.spec.possibleOutputKinds)
        except OutputManifestError as exc:
            return AttemptResult(ok=False, retryable=False, error=f"operator {step.operator!r}: {exc}")
        unit_ids = []
        for index, out in enumerate(result.outputs):
            unit_id = output_unit_id(step.step_id, index)
            key = unit_key(step.run_id, unit_id)
            info = await self.blobs.put_file(key, out.path)  # bytes first, then the event
            await self._append(DataUnitAdded(
                run_id=step.run_id, unit_id=unit_id, data_kind=out.data_kind, ancestors=step.ancestors,
                blob=key, size=info.size, sha256=info.sha256, filename=out.filename,
                step_id=step.step_id, output_index=index,
            ), f"unit:{unit_id}")
            unit_ids.append(unit_id)
        await self._append(StepSucceeded(run_id=step.run_id, step_id=step.step_id, attempt=attempt_no,
                                         outputs=unit_ids, logs_blob=logs), f"{step.step_id}:succeeded")
        log.info("step succeeded", extra={"run_id": step.run_id, "step_id": step.step_id, "outputs": len(unit_ids)})
        return AttemptResult(ok=True)
