"""The step worker: takes ``StepScheduled`` from a durable pull consumer shared by every
executor, runs each step's attempts on its backend and appends what happened.

* at-least-once delivery, exactly-once effects: every event it appends has an id derived from the
  fact (step, attempt, output index), a redelivered step whose attempt had started re-attaches
  to the same external id (agent step id, Job name) instead of starting it again, and an attempt
  is released where it ran (agent step deleted, Job removed) only after its outcome is appended
  (:mod:`.backend`), so there is always something to re-attach to;
* outcome writes (blobs, events) that fail are retried with a capped backoff for
  ``outcome_retry_for`` seconds; outputs that still cannot be stored lose the attempt visibly
  ("cannot store output 0 ...: No space left on device"), never loop;
* failures are classified: an attempt the operator failed uses ``spec.retries``; one lost to the
  infrastructure (``AttemptResult.lost``: agent restarted or unreachable, blob store unavailable)
  is retried up to ``infra_retries`` without using them, and its ``StepAttemptFailed`` /
  ``StepFailed`` says ``infrastructure=true``; an executor that died is no failure at all (its
  step is redelivered and re-attached);
* a dead executor's steps are taken over within about the ack-wait (5 s by default): one ticker
  sends ``in_progress`` for every step held, every third of the ack-wait, so a live executor's
  long step is never redelivered — two beats in a row may be lost (a slow reconnect, an event
  loop stalled by up to two thirds of the ack-wait; a late beat is logged) before it is. The
  ticker never waits for a backend or a step and nothing the worker does blocks the loop for
  long (file removals run in a thread). A redelivery to a live executor's step anyway is safe:
  it re-attaches to the attempt that exists, and a backend that finds nothing to attach to
  creates it only after a fresh read of the run (``Attempt.check_open``), since a release
  follows a recorded outcome;
* the consumer's ack-wait is the deployment's, set by whoever created the consumer (or
  ``update_consumer``), never silently changed by a late starter; every executor follows a
  change of it within ``ACK_WAIT_CHECK`` seconds (and beats by the smaller of its own and the
  consumer's), so lowering it never has a live executor's steps redelivered;
* retries with exponential backoff and jitter; ``spec.timeoutSeconds`` is enforced by the
  backend (the agent kills the process group, Kubernetes the Job);
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
from typing import Any, Awaitable, Callable, TypeVar

from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError

from mlynar_events.blobs import BlobStore, logs_key, unit_key
from mlynar_events.events import (
    STREAM, DataUnitAdded, Event, RunDeleted, RunTerminationRequested, StepAttemptFailed, StepCancelled,
    StepFailed, StepScheduled, StepStarted, StepSucceeded, subject_filters,
)
from mlynar_events.outputs import OutputManifestError, check_kinds
from mlynar_events.runstate import RunState, RunStateCache
from mlynar_events.store import EventStore, decode, is_transient, retrying
from mlynar_events.tasks import cancel_and_wait

from .backend import Attempt, AttemptResult, AttemptSuperseded, Backend
from .metrics import StepMetrics

log = logging.getLogger("mlynar.executor")
T = TypeVar("T")

DURABLE = "executors"
CONSUMER_EXISTS = 10148  # JSConsumerAlreadyExists: created by another executor with another config
OUTPUT_NAMESPACE = uuid.UUID("5b0f1f6e-8f5e-4a7a-9a43-6d1f8e0c2a11")
ACK_WAIT_CHECK = 10.0  # seconds between reads of the shared consumer's ack-wait


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
        ack_wait: float = 5.0,
        retry_base: float = 1.0,
        workdir: Path | None = None,
        name: str | None = None,
        infra_retries: int = 3,
        outcome_retry_for: float = 60.0,
        update_consumer: bool = False,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.backends = backends  # "machine" / "kubernetes"
        self.concurrency = concurrency
        self.ack_wait = ack_wait  # the consumer's, once ensure_consumer has run
        self.configured_ack_wait = ack_wait  # this executor's own setting
        self.retry_base = retry_base
        self.workdir = workdir or Path(tempfile.gettempdir()) / "mlynar-executor"
        self.name = name or f"executor:{socket.gethostname()}:{uuid.uuid4().hex[:6]}"
        self.infra_retries = infra_retries  # attempts lost to infrastructure retried, per step
        self.outcome_retry_for = outcome_retry_for  # seconds an attempt's outcome writes are retried
        self.update_consumer = update_consumer  # True: this executor's ack_wait replaces the consumer's
        self.running: dict[str, Attempt] = {}  # step_id -> current attempt
        self.held: dict[int, Any] = {}  # the messages being handled, beaten by one ticker
        self.heartbeat_late_max = 0.0  # seconds the ticker woke up late, at worst (a busy loop)
        self.heartbeat_rounds = 0  # rounds of beats sent (the fault suite waits on it between stalls)
        self.active = 0  # messages being handled
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._handling: dict[str, asyncio.Event] = {}  # step_id -> set when its handler ends
        self._runs = RunStateCache(store)
        self.metrics = StepMetrics(self.running)  # the mlynar_steps_* metrics (executors/metrics.py)

    # ---- consumer ---------------------------------------------------------------------------

    def consumer_config(self, ack_wait: float) -> js_api.ConsumerConfig:
        return js_api.ConsumerConfig(
            durable_name=DURABLE,
            filter_subject=subject_filters(self.SCHEDULES)[0],
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=10_000,
            deliver_policy=js_api.DeliverPolicy.ALL,
        )

    async def ensure_consumer(self) -> None:
        """Create the shared consumer, or use the one that exists. Its ack-wait is one setting of
        the deployment: an executor configured otherwise warns and heartbeats by the consumer's
        (every executor restarting with its own value used to make the last one win for all),
        unless ``update_consumer`` says to change it. A changed subject filter (a new build) is
        always brought up to date."""
        js = self.store.js
        try:
            info = await retrying(lambda: js.consumer_info(STREAM, DURABLE), "consumer info", self.store.retry_for)
        except NotFoundError:
            info = None
        if info is None:
            try:
                await retrying(lambda: js.add_consumer(STREAM, self.consumer_config(self.ack_wait)),
                               "add consumer", self.store.retry_for)
                return
            except APIError as exc:
                if exc.err_code != CONSUMER_EXISTS:  # another executor created it meanwhile
                    raise
                info = await retrying(lambda: js.consumer_info(STREAM, DURABLE), "consumer info", self.store.retry_for)
        current = info.config
        existing = float(current.ack_wait or self.ack_wait)
        wanted = self.ack_wait if self.update_consumer else existing
        if not self.update_consumer and abs(existing - self.ack_wait) > 1e-6:
            log.warning("the shared consumer's ack-wait differs from this executor's; using the consumer's "
                        "(start one executor with --executor-update-consumer to change it for every executor)",
                        extra={"executor": self.name, "consumer_ack_wait": existing, "configured_ack_wait": self.ack_wait})
        self.ack_wait = wanted
        config = self.consumer_config(wanted)
        if abs(existing - wanted) > 1e-6 or current.filter_subject != config.filter_subject:
            await retrying(lambda: js.add_consumer(STREAM, config), "update consumer", self.store.retry_for)
            log.info("shared consumer updated", extra={"executor": self.name, "ack_wait": wanted})

    async def run(self) -> None:
        await self.ensure_consumer()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cancels = asyncio.create_task(self._follow_cancellations(), name="executor-cancellations")
        beats = [asyncio.create_task(self._heartbeats(), name="executor-heartbeats"),
                 asyncio.create_task(self._follow_ack_wait(), name="executor-ack-wait")]
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
                except Exception as exc:
                    # 409: the pull request ended by the server (leadership change, shutdown)
                    if not (is_transient(exc) or (isinstance(exc, APIError) and exc.code == 409)):
                        raise
                    # a leader change or a node restarting: pull again shortly, never crash the role
                    log.warning("pulling steps failed; pulling again", extra={"executor": self.name, "error": repr(exc)})
                    await asyncio.sleep(0.5 + random.random())
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
            await cancel_and_wait(beats)

    async def _handle(self, msg) -> None:  # type: ignore[no-untyped-def]
        self.held[id(msg)] = msg
        try:
            stored = decode(msg)
            if stored is not None and isinstance(stored.event, StepScheduled):
                await self._execute_once(stored.event)
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
            self.held.pop(id(msg), None)
            self.active -= 1
            self._slot_freed.set()

    @property
    def heartbeat_interval(self) -> float:
        return max(min(self.ack_wait, self.configured_ack_wait) / 3, 0.2)

    async def _heartbeats(self) -> None:
        """``in_progress`` for every held step, every third of the ack-wait: one ticker, so a
        step's backend call or a slow append never delays its beat. It measures how late it
        wakes up: a loop blocked for longer than a beat is logged (two thirds of the ack-wait
        and the steps held would be redelivered, and re-attached elsewhere)."""
        loop = asyncio.get_running_loop()
        while True:
            interval = self.heartbeat_interval
            due = loop.time() + interval
            await asyncio.sleep(interval)
            late = loop.time() - due
            self.heartbeat_late_max = max(self.heartbeat_late_max, late)
            if late > interval and self.held:
                log.warning("heartbeats were late: the executor's event loop was busy",
                            extra={"executor": self.name, "late": round(late, 2), "ack_wait": self.ack_wait,
                                   "held": len(self.held)})
            for msg in list(self.held.values()):
                try:
                    await msg.in_progress()  # a publish: buffered while reconnecting, never awaited
                except Exception:  # noqa: BLE001 - closed connection: the next beat or the redelivery
                    pass
            self.heartbeat_rounds += 1

    async def _follow_ack_wait(self) -> None:
        """Follow the shared consumer's ack-wait, so that lowering it (``update_consumer`` on
        another executor) shortens this executor's beats too."""
        while True:
            await asyncio.sleep(ACK_WAIT_CHECK)
            try:
                info = await self.store.js.consumer_info(STREAM, DURABLE)
            except Exception:  # noqa: BLE001 - a leader change, a reconnect: read it next time
                continue
            current = float(info.config.ack_wait or self.ack_wait)
            if abs(current - self.ack_wait) > 1e-6:
                log.info("the shared consumer's ack-wait changed; beating by it",
                         extra={"executor": self.name, "ack_wait": current, "was": self.ack_wait})
                self.ack_wait = current

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

    async def _execute_once(self, step: StepScheduled) -> None:
        """A step redelivered while this executor still handles it (its heartbeats could not reach
        NATS) waits for that handler, then finds the step finished or picks up where it ended."""
        while (busy := self._handling.get(step.step_id)) is not None:
            await busy.wait()
        done = self._handling[step.step_id] = asyncio.Event()
        self.metrics.track(step)
        try:
            await self.execute(step)
        finally:
            self.metrics.forget(step.step_id)
            del self._handling[step.step_id]
            done.set()

    async def _run_state(self, run_id: str) -> RunState:
        return await self._runs.get(run_id)

    async def _append(self, event: Event, msg_id: str) -> None:
        ack = await self.store.append(event, actor=self.name, msg_id=msg_id)
        self.metrics.appended(event, ack.duplicate)

    async def execute(self, step: StepScheduled) -> None:
        state = await self._run_state(step.run_id)
        current = state.steps.get(step.step_id)
        ctx = {"run_id": step.run_id, "step_id": step.step_id, "operator": step.operator}
        kind = "machine" if step.spec.machine else "kubernetes"
        backend = self.backends.get(kind)
        if not state.exists or current is None or current.finished:
            if current is not None and current.finished and current.attempt and backend is not None:
                # its outcome is appended: what may be left is the release (crashed right before it)
                await self._release(backend, self._attempt_of(backend, step, current.attempt),
                                    failed=current.status != "success")
            log.info("step needs nothing more", extra=ctx)
            return
        if state.termination is not None and state.termination.cancel:
            await self._append(StepCancelled(run_id=step.run_id, step_id=step.step_id, reason="run terminated"),
                               f"{step.step_id}:cancelled")
            if current.attempt and backend is not None:  # an attempt left running by a dead executor
                await self._release(backend, self._attempt_of(backend, step, current.attempt), failed=True)
            return
        if backend is None:
            await self._append(StepFailed(run_id=step.run_id, step_id=step.step_id, attempt=max(current.attempt, 1),
                                          error=f"no {kind} executor is configured in this service"),
                               f"{step.step_id}:failed")
            return
        # a started attempt is re-attached, not restarted; one whose failure is recorded is over
        attempt_no = max(current.attempt, 1) + (1 if current.attempt and current.attempt_ended else 0)
        failures, losses = len(current.failed_attempts), len(current.lost_attempts)
        while True:
            attempt = self._attempt_of(backend, step, attempt_no)
            try:
                result = await self._attempt(backend, attempt, reattach=current.attempt == attempt_no)
                now = await self._run_state(step.run_id)
                if not now.exists:
                    log.info("run deleted while its step ran; keeping nothing", extra=ctx)
                    await self._release(backend, attempt, failed=False)
                    return
                if now.steps[step.step_id].finished:  # another executor (a redelivery) ended it
                    log.info("step finished elsewhere meanwhile", extra={**ctx, "attempt": attempt_no})
                    return
                if result.superseded:  # this attempt ended elsewhere; another is due or running
                    log.info("attempt ended elsewhere; deciding again", extra={**ctx, "attempt": attempt_no})
                    return await self.execute(step)
                deadline = asyncio.get_running_loop().time() + self.outcome_retry_for
                logs = await self._store_logs(step, attempt_no, result, deadline)
                if result.ok:
                    result = await self._outputs(step, attempt_no, result, logs, deadline)
            finally:
                await asyncio.to_thread(shutil.rmtree, attempt.workdir, True)
            if result.ok:
                await self._release(backend, attempt, failed=False)
                return
            if result.cancelled:
                await self._append(StepCancelled(run_id=step.run_id, step_id=step.step_id, reason="cancelled by user",
                                                 attempt=attempt_no, logs_blob=logs),
                                   f"{step.step_id}:cancelled")
                await self._release(backend, attempt, failed=True)
                return
            if result.lost:
                losses += 1
                again = losses <= self.infra_retries
            else:
                failures += 1
                again = result.retryable and failures <= step.spec.retries
            error = result.error or "failed"
            if not again:
                await self._append(StepFailed(run_id=step.run_id, step_id=step.step_id, attempt=attempt_no,
                                              error=error, logs_blob=logs, infrastructure=result.lost),
                                   f"{step.step_id}:failed")
                await self._release(backend, attempt, failed=True)
                log.warning("step failed", extra={**ctx, "attempt": attempt_no, "error": error,
                                                  "infrastructure": result.lost, "failures": failures, "lost": losses})
                return
            delay = backoff(failures + losses, self.retry_base)
            await self._append(StepAttemptFailed(run_id=step.run_id, step_id=step.step_id, attempt=attempt_no,
                                                 error=error, logs_blob=logs, retry_in=round(delay, 3),
                                                 infrastructure=result.lost),
                               f"{step.step_id}:attempt-failed:{attempt_no}")
            await self._release(backend, attempt, failed=True)
            log.info("attempt lost to the infrastructure; retrying" if result.lost else "attempt failed; retrying",
                     extra={**ctx, "attempt": attempt_no, "retry_in": round(delay, 2), "error": error,
                            "failures": failures, "lost": losses})
            await asyncio.sleep(delay)
            attempt_no += 1

    def _attempt_of(self, backend: Backend, step: StepScheduled, attempt_no: int) -> Attempt:
        external_id = backend.external_id(step, attempt_no)
        return Attempt(step, attempt_no, external_id, self.workdir / external_id,
                       is_open=lambda: self._attempt_open(step, attempt_no))

    async def _attempt_open(self, step: StepScheduled, attempt_no: int) -> bool:
        """Neither the step's outcome nor the end of its attempt ``attempt_no`` is recorded (a
        fresh read: every append acknowledged before it is seen)."""
        state = await self._run_state(step.run_id)
        current = state.steps.get(step.step_id)
        if not state.exists or current is None or current.finished:
            return False
        return current.attempt < attempt_no or (current.attempt == attempt_no and not current.attempt_ended)

    async def _release(self, backend: Backend, attempt: Attempt, *, failed: bool) -> None:
        """After the attempt's outcome is appended (never before: see :mod:`.backend`)."""
        try:
            await backend.release(attempt, failed=failed)
        except Exception:  # noqa: BLE001 - the outcome stands; what is left expires where it ran
            log.exception("releasing the attempt failed", extra={"run_id": attempt.step.run_id,
                                                                "step_id": attempt.step.step_id,
                                                                "external_id": attempt.external_id})

    async def _attempt(self, backend: Backend, attempt: Attempt, reattach: bool) -> AttemptResult:
        step = attempt.step
        await self._append(StepStarted(run_id=step.run_id, step_id=step.step_id, attempt=attempt.attempt,
                                       executor=self.name, target=backend.target(step), external_id=attempt.external_id),
                           f"{step.step_id}:started:{attempt.attempt}")
        log.info("re-attaching step" if reattach else "starting step",
                 extra={"run_id": step.run_id, "step_id": step.step_id, "attempt": attempt.attempt,
                        "external_id": attempt.external_id})
        await asyncio.to_thread(shutil.rmtree, attempt.workdir, True)
        attempt.workdir.mkdir(parents=True)
        self.running[step.step_id] = attempt
        try:
            return await backend.run(attempt)
        except AttemptSuperseded as exc:
            log.info("nothing to attach to and the attempt ended elsewhere; not creating it",
                     extra={"run_id": step.run_id, "step_id": step.step_id, "attempt": attempt.attempt,
                            "reason": str(exc)})
            return AttemptResult(ok=False, superseded=True, error=str(exc))
        except Exception as exc:  # a backend bug or an unexpected answer: fail the attempt, keep the worker
            log.exception("backend error", extra={"step_id": step.step_id})
            return AttemptResult(ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            self.running.pop(step.step_id, None)

    async def _write(self, what: str, call: Callable[[], Awaitable[T]], deadline: float, ctx: dict[str, Any]) -> T:
        """A blob write of an attempt's outcome, retried on ``OSError`` (disk full, read-only,
        an unavailable share) with a capped backoff until ``deadline``; then the error is raised."""
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            try:
                return await call()
            except OSError as exc:
                n += 1
                delay = min(self.retry_base * 0.25 * 2 ** (n - 1), 5.0) * (0.5 + random.random())
                if loop.time() + delay > deadline:
                    raise
                log.warning("cannot store the attempt's outcome; retrying",
                            extra={**ctx, "what": what, "error": str(exc), "retry_in": round(delay, 2)})
                await asyncio.sleep(delay)

    async def _store_logs(self, step: StepScheduled, attempt_no: int, result: AttemptResult,
                          deadline: float) -> str | None:
        """The attempt's logs into the blob store; ``None`` when there are none or they cannot be
        stored (the outcome is what matters: it is appended without them)."""
        if result.logs is None or not result.logs.exists():
            return None
        key = logs_key(step.run_id, step.step_id, attempt_no)
        ctx = {"run_id": step.run_id, "step_id": step.step_id, "attempt": attempt_no}
        try:
            await self._write("logs", lambda: self.blobs.put_file(key, result.logs), deadline, ctx)  # type: ignore[arg-type]
        except OSError as exc:
            log.warning("the attempt's logs cannot be stored; its outcome is recorded without them",
                        extra={**ctx, "error": str(exc)})
            return None
        return key

    async def _outputs(self, step: StepScheduled, attempt_no: int, result: AttemptResult, logs: str | None,
                       deadline: float) -> AttemptResult:
        """Check the outputs against the operator, store them, append them and the success
        (the run was seen to exist after the attempt ended). Outputs that cannot be stored lose
        the attempt to the infrastructure, saying why."""
        try:
            check_kinds((o.data_kind for o in result.outputs), step.spec.possibleOutputKinds)
        except OutputManifestError as exc:
            return AttemptResult(ok=False, retryable=False, error=f"operator {step.operator!r}: {exc}")
        ctx = {"run_id": step.run_id, "step_id": step.step_id, "attempt": attempt_no}
        unit_ids = []
        for index, out in enumerate(result.outputs):
            unit_id = output_unit_id(step.step_id, index)
            key = unit_key(step.run_id, unit_id)
            try:  # bytes first, then the event
                info = await self._write(f"output {index}", lambda: self.blobs.put_file(key, out.path), deadline, ctx)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                return AttemptResult(ok=False, lost=True, logs=result.logs,
                                     error=f"cannot store output {index} ({out.data_kind}) in the blob store: {reason}")
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
