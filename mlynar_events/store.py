"""The event store: the ``MLYNAR`` JetStream stream and the only code that talks to it.

Appends are idempotent (``Nats-Msg-Id``) and optionally conditional on a run's version (the stream
sequence of the run's last event, checked by JetStream over ``mlynar.run.<id>.>``). Reads return
:class:`StoredEvent` with the stream sequence as the global position.

**Transient errors are handled here, where they occur.** A clustered stream answers during normal
operation with "no responders" or 503 (no leader yet, a leader change), times out, or says that a
message with the same id is being stored by someone else right now (10158). Each call is retried
with a bounded, jittered backoff for at most ``retry_for`` seconds; the callers only ever see a
result, a :class:`ConcurrencyConflict`, or (after that time) the last error.

**Reads need no consumer.** :meth:`EventStore.read` asks the stream's leader for its head, then
fetches ``[from_seq, head]`` with batched direct gets (``$JS.API.DIRECT.GET``, answered by any
replica); an answer that ends early is confirmed with the leader, so a replica that has not
applied the head yet never makes a read stale. Creating a consumer per read (what this used to
do) goes through the meta leader and is what answered 503 on a cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from . import metrics
from .events import STREAM, SUBJECT_PREFIX, Envelope, Event, StoredEvent, UnknownEventType, key_filter

log = logging.getLogger("mlynar.store")

WRONG_LAST_SEQUENCE = 10071  # JSStreamWrongLastSequenceErrF
DUPLICATE_IN_PROCESS = 10158  # JSStreamDuplicateMessageConflict: the same msg id is being stored now
TRANSIENT_STATUS = {408, 503}  # timeout, no leader / no responders
DIRECT_BATCH = 1000
SUBSCRIPTION_HEARTBEAT = 1.0  # seconds between the server's idle heartbeats to a follower
ATTEMPT_TIMEOUT = 2.0
"""Seconds one append or read request waits for its answer before it is retried (same message
id, so a retry is never a second fact). A request in flight to a stream leader that dies gets no
answer at all: waiting the whole ``timeout`` stalled every append for 10 s after a leader's
SIGKILL, while the cluster had a new leader within a few seconds."""

T = TypeVar("T")


class TransientError(Exception):
    """JetStream could not answer now (no leader, a replica behind); retried by :func:`retrying`."""


def is_transient(exc: BaseException) -> bool:
    """Errors a healthy cluster returns during normal operation (leader change, a node restarting,
    a message id in flight elsewhere); everything else is a real answer."""
    if isinstance(exc, (TransientError, NoStreamResponseError, ServiceUnavailableError, nats.errors.NoRespondersError,
                        nats.errors.TimeoutError, asyncio.TimeoutError,
                        nats.errors.ConnectionReconnectingError)):
        return True
    if isinstance(exc, APIError):
        return exc.err_code == DUPLICATE_IN_PROCESS or exc.code in TRANSIENT_STATUS
    return False


async def retrying(call: Callable[[], Awaitable[T]], what: str, retry_for: float) -> T:
    """``call()`` until it answers, retrying transient errors with a capped, jittered backoff for at
    most ``retry_for`` seconds (then the last error is raised)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for
    n = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            n += 1
            delay = min(0.05 * 2**n, 2.0) * (0.5 + random.random())
            if loop.time() + delay > deadline:
                raise
            log.log(logging.INFO if n == 1 else logging.WARNING, "transient JetStream error; retrying",
                    extra={"call": what, "error": f"{type(exc).__name__}: {exc}", "retry_in": round(delay, 3)})
            await asyncio.sleep(delay)


class ConcurrencyConflict(Exception):
    """The run moved on since the state an append was decided from: reload and decide again."""

    def __init__(self, subject: str, expected: int, description: str = "") -> None:
        super().__init__(f"{subject}: expected last sequence {expected}: {description}")
        self.subject = subject
        self.expected = expected


@dataclass(frozen=True)
class Appended:
    seq: int
    duplicate: bool


def run_filter(run_id: str) -> str:
    return key_filter("run", run_id)


def aggregate_filter(event: Event) -> str:
    return key_filter(event.aggregate, event.key())


def decode(msg: nats.aio.msg.Msg) -> StoredEvent | None:
    """A message of the stream as an event; ``None`` (logged) for a type this build doesn't know,
    so an older replica reading a newer history skips rather than crashes."""
    return _decode(msg.metadata.sequence.stream, msg.subject, msg.data)


def _decode_direct(msg: Msg) -> StoredEvent | None:
    """A direct get's answer: the stored message with its subject and sequence in headers."""
    headers = msg.headers or {}
    return _decode(int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data)


def _decode(seq: int, subject: str, data: bytes) -> StoredEvent | None:
    env = Envelope.model_validate_json(data)
    try:
        event = env.event()
    except UnknownEventType:
        log.warning("skipping event of unknown type", extra={"type": env.type, "subject": subject})
        return None
    return StoredEvent(seq=seq, subject=subject, envelope=env, event=event)


class EventStore:
    def __init__(self, nc: NATS, *, duplicate_window: float = 120.0, replicas: int = 1,
                 retry_for: float = 30.0, timeout: float = 10.0) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=timeout)
        self.duplicate_window = duplicate_window
        self.replicas = replicas
        self.retry_for = retry_for  # how long a call retries transient errors before raising
        self.timeout = timeout  # one request's wait for JetStream's answer
        # the hot path's requests (append, head, reads) retry sooner: see ATTEMPT_TIMEOUT
        self.attempt_timeout = min(timeout, ATTEMPT_TIMEOUT)
        self._quick: JetStreamContext = nc.jetstream(timeout=self.attempt_timeout)

    @classmethod
    async def connect(cls, url: "str | NatsOptions", *, name: str = "mlynar", **kwargs: object) -> "EventStore":
        from .nats_connect import NatsOptions, connect  # noqa: F401  (servers, credentials, start-up retry)

        nc = await connect(url, name=name)
        store = cls(nc, **kwargs)  # type: ignore[arg-type]
        await store.ensure_stream()
        return store

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    def stream_config(self) -> js_api.StreamConfig:
        return js_api.StreamConfig(
            name=STREAM,
            subjects=[f"{SUBJECT_PREFIX}.>"],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
        )

    async def ensure_stream(self) -> None:
        """Create the stream, or bring an existing one's settings up to date (idempotent). Its
        replica count is raised to ``replicas`` (JetStream copies the stream to the new peers);
        one the cluster cannot place (too few nodes, a single server) is logged and the stream
        keeps its count. It is never lowered: a process started with fewer (the default 1) must
        not take an R3 stream's copies away."""
        config = self.stream_config()
        try:
            info = await retrying(lambda: self.js.stream_info(STREAM), "stream info", self.retry_for)
        except NotFoundError:
            try:
                await retrying(lambda: self.js.add_stream(config), "add stream", self.retry_for)
                return
            except APIError as exc:  # another replica created it meanwhile
                if exc.err_code != 10058:
                    raise
                info = await retrying(lambda: self.js.stream_info(STREAM), "stream info", self.retry_for)
        current = info.config
        have = current.num_replicas or 1
        config.num_replicas = max(have, self.replicas)
        settings = (config.duplicate_window, config.subjects, config.allow_direct)
        if config.num_replicas != have:
            try:
                await retrying(lambda: self.js.update_stream(config), "update stream", self.retry_for)
                log.info(f"stream {STREAM} raised from {have} to {config.num_replicas} replicas",
                         extra={"stream": STREAM, "replicas": config.num_replicas, "was": have})
                return
            except APIError as exc:
                log.warning(f"stream {STREAM} cannot have {config.num_replicas} replicas here; it keeps {have}: "
                            f"{exc.description or exc}",
                            extra={"stream": STREAM, "replicas": have, "wanted": config.num_replicas,
                                   "error": exc.description or str(exc)})
                config.num_replicas = have
        if (current.duplicate_window, current.subjects, current.allow_direct) != settings:
            await self.js.update_stream(config)

    # ---- writing ----------------------------------------------------------------------------

    async def append(
        self,
        event: Event,
        *,
        actor: str,
        msg_id: str | None = None,
        expected_seq: int | None = None,
        unless: type[Event] | None = None,
    ) -> Appended:
        """Append one event. ``msg_id`` makes a retry of the same fact a no-op (the duplicate's
        original sequence is returned); ``expected_seq`` makes the append conditional on the
        event's aggregate (``mlynar.<aggregate>.<key>.>``, e.g. the whole run) not having moved
        past that sequence (``ConcurrencyConflict`` otherwise; 0 = the aggregate has no events).
        ``unless`` makes it conditional only on the aggregate having no event of that class (an
        upload into a run unless it was deleted, without contending with the run's other events).

        JetStream checks the expected sequence before de-duplicating, so a retried conditional
        append may see a conflict: callers reload, find their fact there, and do nothing."""
        env = Envelope.wrap(event, actor, event_id=msg_id)
        headers = {"Nats-Msg-Id": env.id}
        subject = event.subject()
        if expected_seq is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_seq)
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = aggregate_filter(event)
        elif unless is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = "0"
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = \
                f"{SUBJECT_PREFIX}.{event.aggregate}.{event.key()}.{unless.event_type}"
        data = env.to_bytes()
        started = time.monotonic()
        try:
            # A retry carries the same Nats-Msg-Id, so one that follows a lost answer (a timeout)
            # or another appender of the same fact (10158, in process elsewhere) is answered with
            # the stored message's sequence as a duplicate: the other appender won.
            tries = 0

            async def publish() -> Any:
                nonlocal tries
                tries += 1
                return await self._quick.publish(subject, data, headers=headers)

            ack = await retrying(publish, f"append {subject}", self.retry_for)
        except Exception as exc:
            conflict = isinstance(exc, APIError) and exc.err_code == WRONG_LAST_SEQUENCE
            if conflict and tries > 1 and (mine := await self._stored_as(subject, env.id)) is not None:
                # a retry's conflict with its own earlier try, whose answer was lost: it is stored
                metrics.EVENT_DUPLICATES.labels(event.event_type).inc()
                return Appended(seq=mine, duplicate=True)
            error = "conflict" if conflict else "unavailable" if is_transient(exc) else "refused"
            metrics.EVENT_APPEND_ERRORS.labels(event.event_type, error).inc()
            if conflict:
                raise ConcurrencyConflict(subject, expected_seq or 0, exc.description or "") from None  # type: ignore[union-attr]
            raise
        finally:
            metrics.EVENT_APPEND_DURATION.observe(time.monotonic() - started)
        (metrics.EVENT_DUPLICATES if ack.duplicate else metrics.EVENTS_APPENDED).labels(event.event_type).inc()
        return Appended(seq=ack.seq, duplicate=bool(ack.duplicate))

    async def _stored_as(self, subject: str, msg_id: str) -> int | None:
        """The sequence of the last message on ``subject`` if it is the one with ``msg_id``."""
        try:
            last = await self._quick.get_last_msg(STREAM, subject)
        except Exception:  # noqa: BLE001 - no answer: the conflict stands as reported
            return None
        return last.seq if (last.headers or {}).get("Nats-Msg-Id") == msg_id else None

    # ---- reading ----------------------------------------------------------------------------

    async def last_seq(self) -> int:
        """The stream's head as its leader knows it (every acknowledged append is at or below)."""
        return (await self._head())[0]

    async def _head(self) -> tuple[int, int]:
        """(last sequence, replicas) from the stream's leader."""
        info = await retrying(lambda: self._quick.stream_info(STREAM), "stream info", self.retry_for)
        return info.state.last_seq, info.config.num_replicas or 1

    async def read(self, subject_filter: str, from_seq: int = 1, batch: int = DIRECT_BATCH) -> list[StoredEvent]:
        """Every event on ``subject_filter`` from ``from_seq`` up to the stream's head now: every
        append acknowledged before the call is in the answer (read-your-writes), whichever
        replica answers."""
        head, replicas = await self._head()
        out: list[StoredEvent] = []
        seq = max(1, from_seq)
        while seq <= head:
            got, last, more = await retrying(
                lambda: self._direct_batch(subject_filter, seq, head, batch, check=replicas > 1),
                f"read {subject_filter}", self.retry_for)
            out.extend(e for e in got if e is not None)
            if not more or last < seq:
                break
            seq = last + 1
        return out

    async def _direct_batch(self, subject_filter: str, seq: int, head: int, batch: int,
                            check: bool) -> tuple[list[StoredEvent | None], int, bool]:
        """One batched direct get of ``subject_filter`` in ``[seq, head]``: (events, the last
        sequence answered, whether more are left).

        Any replica may answer a direct get, and one that has not applied ``head`` yet answers
        short without saying so (nats-server 2.15 does not refuse on ``min_last_seq``). With
        ``check`` (a replicated stream) an answer that ends before ``head`` is confirmed with the
        leader (``STREAM.MSG.GET`` of the next message on the filter); a short one is retried."""
        request = {"seq": seq, "next_by_subj": subject_filter, "batch": batch, "up_to_seq": head}
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        out: list[StoredEvent | None] = []
        last = seq - 1
        try:
            await self.nc.publish(f"$JS.API.DIRECT.GET.{STREAM}", json.dumps(request).encode(), reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=self.attempt_timeout)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "204":  # end of batch
                    more = int(headers.get("Nats-Num-Pending", "0")) > 0
                    break
                if status == "404":  # nothing (more) on the filter
                    more = False
                    break
                if status:
                    description = headers.get("Description", "")
                    if int(status) in TRANSIENT_STATUS:
                        raise TransientError(f"direct get {subject_filter} from {seq}: {status} {description}")
                    raise APIError(code=int(status), description=description)
                last = int(headers["Nats-Sequence"])
                out.append(_decode_direct(msg))
        except nats.errors.TimeoutError:
            raise TransientError(f"direct get {subject_filter} from {seq}: no answer within {self.attempt_timeout:g} s") from None
        finally:
            await sub.unsubscribe()
        if check and not more and last < head:
            try:
                following = await self._quick.get_msg(STREAM, seq=last + 1, subject=subject_filter, next=True)
            except NotFoundError:
                following = None
            if following is not None and following.seq is not None and following.seq <= head:
                raise TransientError(f"direct get {subject_filter} from {seq}: a replica behind the head "
                                     f"{head} answered up to {last}")
        return out, last, more

    async def load_run(self, run_id: str, from_seq: int = 1) -> tuple[list[StoredEvent], int]:
        """A run's history and its version (0 when it has none)."""
        events = await self.read(run_filter(run_id), from_seq)
        return events, (events[-1].seq if events else 0)

    async def subscribe(
        self, subject_filters: Sequence[str] | str, from_seq: int = 1
    ) -> "Subscription":
        """Follow the stream from ``from_seq`` on, in order, forever (an ordered consumer: gaps
        are repaired by the client by recreating the consumer)."""
        filters = [subject_filters] if isinstance(subject_filters, str) else list(subject_filters)
        start_head = await self.last_seq()
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, from_seq),
            filter_subjects=filters if len(filters) > 1 else None,
            mem_storage=True,
        )
        sub = await retrying(lambda: self.js.subscribe(
            filters[0] if len(filters) == 1 else "",
            ordered_consumer=True,
            # the client recreates an ordered consumer after two missed heartbeats: at 1 s a
            # follower is back within seconds of a NATS restart or a leader change (at the
            # default 5 s it took 10-20 s, and every run waited for its solver that long)
            idle_heartbeat=SUBSCRIPTION_HEARTBEAT,
            config=config,
            stream=STREAM,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        ), f"subscribe {filters}", self.retry_for)
        return Subscription(sub, start_head)


class Subscription:
    """Async iterator of events; ``caught_up`` tells whether the head seen at start is reached."""

    def __init__(self, sub: JetStreamContext.PushSubscription, start_head: int) -> None:
        self._sub = sub
        self.start_head = start_head
        self.last_seq = 0

    def __aiter__(self) -> AsyncIterator[StoredEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StoredEvent]:
        async for msg in self._sub.messages:
            self.last_seq = msg.metadata.sequence.stream
            self.pending = msg.metadata.num_pending
            event = decode(msg)
            if event is not None:
                yield event

    pending: int = 0

    async def close(self) -> None:
        try:
            await self._sub.unsubscribe()
        except Exception:  # connection already closed
            pass
