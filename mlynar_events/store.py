"""The event store: the ``MLYNAR`` JetStream stream and the only code that talks to it.

Appends are idempotent (``Nats-Msg-Id``) and optionally conditional on a run's version (the stream
sequence of the run's last event, checked by JetStream over ``mlynar.run.<id>.>``). Reads return
:class:`StoredEvent` with the stream sequence as the global position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError

from .events import STREAM, SUBJECT_PREFIX, Envelope, Event, StoredEvent, UnknownEventType, key_filter

log = logging.getLogger("mlynar.store")

WRONG_LAST_SEQUENCE = 10071  # JSStreamWrongLastSequenceErrF


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
    env = Envelope.model_validate_json(msg.data)
    try:
        event = env.event()
    except UnknownEventType:
        log.warning("skipping event of unknown type", extra={"type": env.type, "subject": msg.subject})
        return None
    return StoredEvent(seq=msg.metadata.sequence.stream, subject=msg.subject, envelope=env, event=event)


class EventStore:
    def __init__(self, nc: NATS, *, duplicate_window: float = 120.0, replicas: int = 1) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10.0)
        self.duplicate_window = duplicate_window
        self.replicas = replicas

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
        """Create the stream, or bring an existing one's settings up to date (idempotent)."""
        config = self.stream_config()
        try:
            info = await self.js.stream_info(STREAM)
        except NotFoundError:
            try:
                await self.js.add_stream(config)
                return
            except APIError as exc:  # another replica created it meanwhile
                if exc.err_code != 10058:
                    raise
                info = await self.js.stream_info(STREAM)
        current = info.config
        if (current.duplicate_window, current.subjects, current.allow_direct) != (
            config.duplicate_window, config.subjects, config.allow_direct
        ):
            await self.js.update_stream(config)

    # ---- writing ----------------------------------------------------------------------------

    async def append(
        self,
        event: Event,
        *,
        actor: str,
        msg_id: str | None = None,
        expected_seq: int | None = None,
    ) -> Appended:
        """Append one event. ``msg_id`` makes a retry of the same fact a no-op (the duplicate's
        original sequence is returned); ``expected_seq`` makes the append conditional on the
        event's aggregate (``mlynar.<aggregate>.<key>.>``, e.g. the whole run) not having moved
        past that sequence (``ConcurrencyConflict`` otherwise; 0 = the aggregate has no events).

        JetStream checks the expected sequence before de-duplicating, so a retried conditional
        append may see a conflict: callers reload, find their fact there, and do nothing."""
        env = Envelope.wrap(event, actor, event_id=msg_id)
        headers = {"Nats-Msg-Id": env.id}
        subject = event.subject()
        if expected_seq is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_seq)
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = aggregate_filter(event)
        try:
            ack = await self.js.publish(subject, env.to_bytes(), headers=headers)
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise ConcurrencyConflict(subject, expected_seq or 0, exc.description or "") from None
            raise
        return Appended(seq=ack.seq, duplicate=bool(ack.duplicate))

    # ---- reading ----------------------------------------------------------------------------

    async def last_seq(self) -> int:
        info = await self.js.stream_info(STREAM)
        return info.state.last_seq

    async def read(self, subject_filter: str, from_seq: int = 1, batch: int = 1000) -> list[StoredEvent]:
        """Every event on ``subject_filter`` from ``from_seq`` up to the stream's head now."""
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, from_seq),
            filter_subject=subject_filter,
            mem_storage=True,
            inactive_threshold=30.0,
            num_replicas=1,
        )
        info = await self.js.add_consumer(STREAM, config)
        remaining = info.num_pending or 0
        out: list[StoredEvent] = []
        try:
            if remaining:
                psub = await self.js.pull_subscribe_bind(consumer=info.name, stream=STREAM)
                try:
                    while remaining > 0:
                        msgs = await psub.fetch(batch=min(batch, remaining), timeout=10.0)
                        remaining -= len(msgs)
                        out.extend(e for e in map(decode, msgs) if e is not None)
                finally:
                    await psub.unsubscribe()
        finally:
            try:
                await self.js.delete_consumer(STREAM, info.name)
            except (NotFoundError, APIError):
                pass
        return out

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
        sub = await self.js.subscribe(
            filters[0] if len(filters) == 1 else "",
            ordered_consumer=True,
            config=config,
            stream=STREAM,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
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
