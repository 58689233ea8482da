"""The webhook dispatcher: POSTs every event a webhook subscribed to, as a signed CloudEvent.

Why it is built this way:

* **A delivery adds no load to the append path.** A JetStream consumer costs the server work on
  every append (each consumer's pending count, its pull, its ack), so a consumer per webhook made
  every append pay for every webhook. The webhooks that keep up share **one** durable consumer,
  the fan-out (:data:`mlynar_events.webhooks.FANOUT_CONSUMER`): one pull and one ack per event
  however many webhooks there are; each event goes to every attached webhook it concerns
  (:func:`mlynar_events.webhooks.subject_matches` applies the webhook's filters in process), all
  at once. Its own filters are the union of the attached webhooks'
  (:func:`mlynar_events.webhooks.fanout_filters`), so the server does not hand it the events no
  attached webhook asked for.
* **A slow or failing receiver holds no one else back.** The fan-out waits at most
  ``--webhook-patience`` for the attempts of one event. A webhook that failed, or has not
  answered by then, is *detached* at that event: it gets its own durable consumer starting there
  (:func:`mlynar_events.webhooks.consumer_name`), filtered by its types/runs, and its unfinished
  attempt is handed over, so it is never sent twice at once. The fan-out acks and goes on. A
  detached webhook retries with backoff on its own; once its consumer is drained and its last
  attempt was fast, it *attaches* again: under the fan-out's lock, between two of its events,
  the fan-out takes over from the ack floor of the webhook's consumer (it skips what the webhook
  already had), and that consumer is deleted.
* **At least once, in order, across outages and restarts.** Every position is a durable
  consumer's, with explicit acks and ``max_ack_pending=1``: the server hands out the next event
  only after the previous one was acked, and the position survives anything because it is the
  server's. Which webhooks are attached is recorded in the KV bucket
  :data:`mlynar_events.webhooks.FANOUT_BUCKET`; a webhook that has its own consumer is detached
  whatever the record says. Every change creates the new holder of a position before it removes
  the old one, so a crash in between repeats events (the same ``webhook-id``), never loses one.
  While an event is being delivered its message is held (``in_progress`` heartbeats); a
  dispatcher that stops hands it back at once (a nak), one that dies loses it to
  ``--webhook-ack-wait``.
* **One dispatcher delivers.** Replicas fold the webhook events alike, but only the holder of
  the lease ``webhooks`` (:mod:`mlynar_events.lease`) delivers, so attaching and detaching are
  one process's decisions. A standby takes over ``--webhook-lease-ttl`` after the leader died, at
  once after a graceful stop.
* **Failing.** Retries back off exponentially up to ``--webhook-retry-cap``; after
  ``--webhook-max-failures`` consecutive failures the dispatcher appends ``WebhookDisabled`` and
  stops pulling. The failed event stays unacked in the webhook's consumer, so ``WebhookEnabled``
  resumes exactly there. (The count of consecutive failures starts again when a dispatcher
  restarts.)
* **SSRF.** The target is checked again before every attempt, and the HTTP client connects only
  to addresses that pass (:class:`mlynar_events.webhooks.GuardedResolver`); redirects are not
  followed, proxies from the environment are not used.
* **What it records.** The last attempts per webhook go to the KV bucket
  ``mlynar-webhook-deliveries``, where the API reads them: the roles meet on NATS only. A failed
  attempt is written at once; successes at most every :data:`RECORD_EVERY` per webhook
  (:class:`DeliveryLog`), because a write per delivery is a JetStream write per delivery on the
  server the appends go to, and the records are a view, not the position.

A deleted webhook's consumer and records are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import api as js_api
from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import TypeAdapter

from mlynar_events import metrics
from mlynar_events.cloudevents import CONTENT_TYPE, cloudevent_json
from mlynar_events.config import WebhookSettings
from mlynar_events.events import (
    STREAM, SUBJECT_PREFIX, RunCreated, RunEvent, StoredEvent, WebhookCreated, WebhookDeleted, WebhookDisabled,
    WebhookEnabled,
    WebhookSecretRotated, subject_filters,
)
from mlynar_events.lease import Lease, leases_bucket
from mlynar_events.principals import Principal, Role, may_see
from mlynar_events.secrets import SecretStore
from mlynar_events.store import EventStore, decode
from mlynar_events.tasks import cancel_and_wait
from mlynar_events.webhooks import (
    ATTACHED_KEY, FANOUT_CONSUMER, KEPT_DELIVERIES, DeliveryAttempt, GuardedResolver, WebhookRuleError, check_target,
    consumer_name, deliveries_bucket, deliveries_json, delivery_filters, fanout_bucket, fanout_filters,
    read_deliveries, signature, subject_matches,
)

log = logging.getLogger("mlynar.webhooks")
T = TypeVar("T")

ACTOR = "webhooks"
LEASE = "webhooks"
"""The lease whose holder delivers (:mod:`mlynar_events.lease`)."""
DISABLED_IDS = uuid.UUID("0d7c2a4e-31f5-4c43-9a57-5c1b1d7e6f21")
FETCH_WAIT = 5.0
"""Seconds one pull request waits on the server for the next event (it returns at once when
one arrives; this only bounds how often an idle webhook's task wakes up)."""
_ATTACHED = TypeAdapter(dict[str, int])
FANOUT_DESCRIPTION = "the webhooks' shared fan-out"
RECORD_EVERY = 1.0
"""Seconds between two writes of a webhook's delivery records while only successes happen: a
burst of deliveries is one write per webhook per interval. A crash loses at most that much of
the record (never a delivery: the consumer's position is the truth)."""


@dataclass
class Hook:
    """A webhook as folded from its events; the delivery task reads it live (a rotation takes
    effect at the next attempt)."""

    id: str
    url: str
    filters: list[str]
    start_seq: int
    secret_ref: str
    epoch: int
    """Sequence of its creation or last enabling: names the one disable decision per epoch."""
    previous_ref: str | None = None
    grace_until: datetime | None = None
    active: bool = True
    deleted: bool = False
    sees_as: Principal | None = None
    """A member's webhook: only what that member may see is delivered (None: everything)."""
    skip_through: int = 0
    """Attached: the last event it had on its own consumer, which the fan-out does not repeat."""
    handover: Handover | None = None

    def signing_refs(self, now: datetime) -> list[str]:
        """The current secret, and the previous one during its grace period."""
        if self.previous_ref and self.grace_until and now < self.grace_until:
            return [self.secret_ref, self.previous_ref]
        return [self.secret_ref]


@dataclass
class Handover:
    """The fan-out detached a webhook at event ``seq``: its first attempt at it (still running,
    or None when it failed and was recorded) is the detached task's to finish, not to repeat."""

    seq: int
    attempt: asyncio.Task[DeliveryAttempt] | None


class SecretMissing(Exception):
    pass


class Heartbeat:
    """Keeps holding a message that is being delivered or retried (else it would go to another
    replica): ``in_progress`` every ``interval``. Timers, not a task, because nearly every delivery
    ends long before the first beat, and a task per delivery is CPU the append path shares."""

    def __init__(self, msg: Msg, interval: float) -> None:
        self.msg = msg
        self.interval = interval
        self.loop = asyncio.get_running_loop()
        self.beats: set[asyncio.Task] = set()  # held: the loop keeps only weak references
        self._timer = self.loop.call_later(interval, self._beat)

    def _beat(self) -> None:
        task = self.loop.create_task(self.msg.in_progress())
        self.beats.add(task)
        task.add_done_callback(self._done)
        self._timer = self.loop.call_later(self.interval, self._beat)

    def _done(self, task: asyncio.Task) -> None:
        self.beats.discard(task)
        if not task.cancelled():
            task.exception()  # a missed beat is retried by the next one: not an error to report

    def cancel(self) -> None:
        self._timer.cancel()


class DeliveryLog:
    """A webhook's last attempts and their record in the KV bucket.

    :meth:`add` of a failure writes at once (a user looking at a failing webhook sees why, and
    the record is there before ``WebhookDisabled`` is); a success schedules one write for
    :data:`RECORD_EVERY` later, which then carries every attempt added meanwhile."""

    def __init__(self, kv: KeyValue, webhook_id: str, kept: list[DeliveryAttempt]) -> None:
        self.kv = kv
        self.webhook_id = webhook_id
        self.attempts: deque[DeliveryAttempt] = deque(kept, maxlen=KEPT_DELIVERIES)
        self._later: asyncio.Task | None = None
        self._unwritten = False

    async def add(self, attempt: DeliveryAttempt) -> None:
        self.attempts.append(attempt)
        self._unwritten = True
        if attempt.error is not None:
            await self.write()
        elif self._later is None or self._later.done():
            self._later = asyncio.create_task(self._write_later(), name=f"webhook-record-{self.webhook_id}")

    async def _write_later(self) -> None:
        await asyncio.sleep(RECORD_EVERY)
        await self.write()

    async def write(self) -> None:
        """The attempts so far, if any is unwritten; a failure to write never holds up delivery."""
        if not self._unwritten:
            return
        self._unwritten = False
        try:
            await self.kv.put(self.webhook_id, deliveries_json(self.attempts))
        except asyncio.CancelledError:
            self._unwritten = True  # close() writes it
            raise
        except Exception:  # noqa: BLE001 - the record is a view; the delivery is what counts
            self._unwritten = True
            log.warning("could not record a webhook delivery", exc_info=True, extra={"webhook_id": self.webhook_id})

    async def close(self) -> None:
        """What is still unwritten, now (the delivery task is stopping)."""
        if self._later is not None:
            self._later.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._later
        await self.write()


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout:g}s"
    return f"{type(exc).__name__}: {exc}"[:500]


class WebhookDispatcher:
    CONSUMES = (WebhookCreated, WebhookSecretRotated, WebhookDisabled, WebhookEnabled, WebhookDeleted)
    READS = (RunCreated,)
    """Looked up, not followed: the owner of a run whose event a member's webhook may receive."""

    def __init__(self, store: EventStore, secrets: SecretStore, settings: WebhookSettings, *,
                 allow_private: bool) -> None:
        self.store = store
        self.secrets = secrets
        self.settings = settings
        self.allow_private = allow_private
        self.hooks: dict[str, Hook] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        """The detached webhooks' delivery tasks."""
        self.attached: set[str] = set()
        """The webhooks the fan-out delivers (they have no consumer of their own)."""
        self.logs: dict[str, DeliveryLog] = {}
        self.leading = False
        self.feed: asyncio.Task | None = None
        self.feed_running = False
        self._feed_lock = asyncio.Lock()
        """Held while the fan-out handles one event and while a webhook attaches: an attach
        sees the fan-out between two events, never in the middle of one."""
        self._reconcile_lock = asyncio.Lock()
        self._dirty: set[str] = set()
        self._folded = asyncio.Condition()
        self.folded_through = 0
        self._secret_values: dict[str, str] = {}  # a reference names one value forever: never stale
        self._run_owners: dict[str, str | None] = {}  # run id -> owner (a run's owner never changes)
        self.kv: KeyValue | None = None
        self.fanout_kv: KeyValue | None = None
        self.http: aiohttp.ClientSession | None = None
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    async def run(self) -> None:
        js = self.store.js
        self.kv = await self._until_it_works("open the delivery records bucket",
                                             lambda: deliveries_bucket(js, self.store.replicas))
        self.fanout_kv = await self._until_it_works("open the fan-out bucket", lambda: fanout_bucket(js, self.store.replicas))
        leases = await self._until_it_works("open the leases bucket",
                                            lambda: leases_bucket(js, self.settings.lease_ttl, self.store.replicas))
        lease = Lease(leases, LEASE, self.holder, self.settings.lease_ttl)
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.allow_private)),
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout), trust_env=False)
        try:
            sub = await self._until_it_works("follow the webhook events",
                                             lambda: self.store.subscribe(subject_filters(self.CONSUMES)))
        except BaseException:
            await self.http.close()
            raise
        log.info("webhook dispatcher started", extra={"allow_private": self.allow_private, "holder": self.holder})
        lead = asyncio.create_task(self._lead_forever(lease), name="webhooks-lead")
        try:
            async for stored in sub:
                self.apply(stored)
                async with self._folded:
                    self.folded_through = stored.seq
                    self._folded.notify_all()
                if sub.pending == 0:  # caught up: act on the folded state, not on each step of history
                    await self._reconcile()
        finally:
            await _wait_out({lead})
            await self._stop_deliveries()
            await _wait_out({asyncio.ensure_future(lease.release())}, 2.0, cancel=False)
            await sub.close()
            await self.http.close()

    # ---- who delivers: the lease -------------------------------------------------------------

    async def _lead_forever(self, lease: Lease) -> None:
        """Deliver while this replica holds the lease; wait for it again when it is lost. One
        replica delivers at a time, so which webhooks the fan-out serves is one process's
        decision, and a standby takes over ``--webhook-lease-ttl`` after the leader died."""
        while True:
            await lease.acquire()
            keeper = asyncio.create_task(lease.keep(), name="webhooks-lease")
            failed = False
            try:
                await self._start_leading()
                await keeper
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug or NATS gone: give the lease back, start over
                log.exception("webhook dispatcher stopped leading after an error")
                failed = True
            finally:
                keeper.cancel()
                self.leading = False
            await self._stop_deliveries()
            if failed:
                await lease.release()
                await asyncio.sleep(self.settings.lease_ttl / 3)
            log.warning("webhook dispatcher no longer delivers; waiting for the lease again",
                        extra={"holder": self.holder})

    async def _start_leading(self) -> None:
        """Take over what the previous leader left: the fold must have seen every webhook event
        there is (else a webhook it attached would be passed over), then the attached ones are
        those in the record that have no consumer of their own, the others are detached."""
        last = 0
        for subject in subject_filters(self.CONSUMES):
            got = await self._until_it_works("read the webhook events",
                                             lambda: self.store.read(subject, self.folded_through + 1))
            if got:
                last = max(last, got[-1].seq)
        async with self._folded:
            await self._folded.wait_for(lambda: self.folded_through >= last)
        js = self.store.js
        recorded = await self._until_it_works("read the attached webhooks", self._read_attached)
        fanout = await self._until_it_works("look up the fan-out", lambda: self._consumer_exists(FANOUT_CONSUMER))
        attached = set()
        for webhook_id, skip_through in sorted(recorded.items()) if fanout else ():
            hook = self.hooks.get(webhook_id)
            own = await self._until_it_works("look up a webhook's consumer",
                                             lambda: self._consumer_exists(consumer_name(webhook_id)))
            if hook is not None:
                hook.skip_through = skip_through  # (without the fan-out: where its own consumer starts)
                if hook.active and not hook.deleted and not own:
                    attached.add(webhook_id)
        async with self._feed_lock:
            self.leading = True
            self.attached = attached
            if attached != set(recorded):
                await self._until_it_works("record the attached webhooks", self._write_attached)
            if attached:
                await self._until_it_works("update the fan-out", lambda: self._update_consumer(FANOUT_CONSUMER,
                                                                                              FANOUT_DESCRIPTION))
                self._start_feed()
            elif fanout:
                with contextlib.suppress(NotFoundError):
                    await js.delete_consumer(STREAM, FANOUT_CONSUMER)
        log.info("webhook dispatcher leading", extra={"holder": self.holder, "attached": len(attached),
                                                      "webhooks": len(self.hooks)})
        self._dirty |= set(self.hooks)
        await self._reconcile()

    async def _stop_deliveries(self, timeout: float = 5.0) -> None:
        """Stop delivering: cancel the fan-out, every detached task and every attempt handed over,
        and wait until each has handed its event back (``nak``), while the connection is still
        open; then write what the delivery records still lack."""
        tasks = set(self.tasks.values()) | {h.handover.attempt for h in self.hooks.values()
                                             if h.handover is not None and h.handover.attempt is not None}
        if self.feed is not None:
            tasks.add(self.feed)
        await _wait_out(tasks, timeout)
        logs, self.logs = list(self.logs.values()), {}
        await _wait_out({asyncio.ensure_future(history.close()) for history in logs}, timeout, cancel=False)
        self.tasks.clear()
        self.attached = set()
        self.feed, self.feed_running = None, False
        for hook in self.hooks.values():
            hook.handover = None

    async def _until_it_works(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, again after a pause while NATS is unreachable (the embedded server being
        restarted, a cluster electing a leader): a dispatcher waits for NATS, it does not stop
        the service."""
        tries = 0
        while True:
            try:
                return await call()
            except (NatsError, OSError, asyncio.TimeoutError) as exc:
                if self.store.nc.is_closed:  # stopping: nothing to wait for
                    raise
                tries += 1
                log.warning("webhook dispatcher cannot %s yet; retrying", what, extra={"error": repr(exc)})
                await asyncio.sleep(min(5.0, 0.2 * 2 ** min(tries, 5)))

    async def _forever(self, what: str, work: Callable[[], Awaitable[None]], context: dict[str, Any]) -> None:
        """``work()`` until it returns; a broken connection or JetStream error restarts it after
        a pause (the position is a consumer's, so nothing is lost)."""
        failures = 0
        while True:
            try:
                await work()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.store.nc.is_closed:
                    # the service is stopping (a cancellation nats-py's wait_for swallowed, gh-86296,
                    # must not leave this loop retrying forever on a closed connection)
                    return
                failures += 1
                log.exception("%s failed; restarting it", what, extra=context)
                await asyncio.sleep(self._backoff(failures))

    # ---- the fold -----------------------------------------------------------------------------

    def apply(self, stored: StoredEvent) -> None:
        event = stored.event
        match event:
            case WebhookCreated():
                try:
                    filters = delivery_filters(event.types, event.runs)
                except WebhookRuleError as exc:  # a type this build no longer has
                    log.error("webhook cannot be delivered by this build", extra={"webhook_id": event.webhook_id,
                                                                                  "error": str(exc)})
                    return
                sees_as = Principal(event.owner, Role.MEMBER) if event.owner_role == "member" and event.owner else None
                self.hooks[event.webhook_id] = Hook(id=event.webhook_id, url=event.url, filters=filters,
                                                    start_seq=stored.seq + 1, secret_ref=event.secret_ref,
                                                    epoch=stored.seq, sees_as=sees_as)
            case WebhookSecretRotated() if event.webhook_id in self.hooks:
                hook = self.hooks[event.webhook_id]
                hook.secret_ref, hook.previous_ref, hook.grace_until = (
                    event.secret_ref, event.previous_ref, event.grace_until)
            case WebhookDisabled() if event.webhook_id in self.hooks:
                self.hooks[event.webhook_id].active = False
            case WebhookEnabled() if event.webhook_id in self.hooks:
                hook = self.hooks[event.webhook_id]
                hook.active, hook.epoch = True, stored.seq
            case WebhookDeleted() if event.webhook_id in self.hooks:
                self.hooks[event.webhook_id].deleted = True
            case _:
                return
        self._dirty.add(event.webhook_id)

    async def _reconcile(self) -> None:
        """The leader delivers every active webhook (attached, or detached with its own task),
        none that is failing or deleted. A standby only folds (a deleted webhook is kept until
        a leader has removed what it left)."""
        if not self.leading:
            return
        async with self._reconcile_lock:
            dirty, self._dirty = self._dirty, set()
            for webhook_id in sorted(dirty):
                hook = self.hooks.get(webhook_id)
                if hook is None or not self.leading:
                    continue
                task = self.tasks.get(webhook_id)
                if hook.active and not hook.deleted:
                    if webhook_id not in self.attached and (task is None or task.done()):
                        self._start_detached(hook)
                    continue
                if task is not None:
                    await cancel_and_wait([task])
                    del self.tasks[webhook_id]
                if webhook_id in self.attached:
                    async with self._feed_lock:
                        self.attached.discard(webhook_id)
                        await self._until_it_works("record the attached webhooks", self._write_attached)
                if hook.deleted:
                    await self._forget(hook)
                    del self.hooks[webhook_id]

    async def _forget(self, hook: Hook) -> None:
        """A deleted webhook's consumer and records go (idempotent: leaders and replays race)."""
        with contextlib.suppress(NotFoundError, APIError):
            await self.store.js.delete_consumer(STREAM, consumer_name(hook.id))
        history = self.logs.pop(hook.id, None)
        if history is not None:
            await history.close()
        if self.kv is not None:
            with contextlib.suppress(Exception):
                await self.kv.purge(hook.id)
        log.info("webhook deleted: its consumer and delivery records removed", extra={"webhook_id": hook.id})

    # ---- which webhooks the fan-out serves ----------------------------------------------------

    async def _read_attached(self) -> dict[str, int]:
        """The record: each attached webhook and the last event it had before it attached."""
        assert self.fanout_kv is not None
        try:
            entry = await self.fanout_kv.get(ATTACHED_KEY)
        except (KeyNotFoundError, KeyDeletedError):
            return {}
        return _ATTACHED.validate_json(entry.value) if entry.value else {}

    async def _write_attached(self) -> None:
        assert self.fanout_kv is not None
        record = {webhook_id: self.hooks[webhook_id].skip_through for webhook_id in sorted(self.attached)
                  if webhook_id in self.hooks}
        await self.fanout_kv.put(ATTACHED_KEY, _ATTACHED.dump_json(record))

    async def _consumer_exists(self, name: str) -> bool:
        try:
            await self.store.js.consumer_info(STREAM, name)
            return True
        except NotFoundError:
            return False

    def _start_feed(self) -> None:
        self.feed_running = True
        self.feed = asyncio.create_task(self._forever("webhook fan-out", self._feed, {}), name="webhooks-fanout")

    def _start_detached(self, hook: Hook) -> None:
        self.tasks[hook.id] = asyncio.create_task(
            self._forever("webhook delivery loop", lambda: self._deliver(hook), {"webhook_id": hook.id}),
            name=f"webhook-{hook.id}")

    async def _add_consumer(self, config: js_api.ConsumerConfig) -> None:
        """Create the durable consumer; one left with another configuration (a crash between two
        steps of an attach or detach) is replaced."""
        js = self.store.js
        try:
            await js.add_consumer(STREAM, config)
        except APIError as exc:
            if isinstance(exc, NotFoundError):
                raise
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(STREAM, config.durable_name)
            await js.add_consumer(STREAM, config)

    def _consumer_config(self, name: str, description: str, filters: list[str] | None, start: int
                         ) -> js_api.ConsumerConfig:
        return js_api.ConsumerConfig(
            durable_name=name,
            description=description,
            filter_subject=filters[0] if filters and len(filters) == 1 else None,
            filter_subjects=filters if filters and len(filters) > 1 else None,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start),
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            max_ack_pending=1,
        )

    async def _own_consumer(self, hook: Hook, start: int) -> None:
        await self._add_consumer(self._consumer_config(consumer_name(hook.id), _own_description(hook.id),
                                                       hook.filters, start))

    async def _detach(self, hook: Hook, seq: int, handover: Handover, reason: str) -> None:
        """The webhook continues on its own consumer from ``seq``, which the fan-out did not get
        through to it (new holder first, then the record: a crash in between repeats ``seq``)."""
        await self._until_it_works("give a webhook its own consumer", lambda: self._own_consumer(hook, seq))
        self.attached.discard(hook.id)
        hook.handover = handover
        await self._until_it_works("record the attached webhooks", self._write_attached)
        self._start_detached(hook)
        log.info("webhook detached from the fan-out: it continues on its own consumer",
                 extra={"webhook_id": hook.id, "seq": seq, "reason": reason})

    async def _try_attach(self, hook: Hook) -> bool:
        """Hand a caught-up, fast webhook to the fan-out (True: its own consumer is gone).

        Called by the webhook's own task between two deliveries, under the fan-out's lock: every
        event its consumer had is acked (up to ``acked``), and the fan-out is between two
        events. The fan-out skips what the webhook already had (``skip_through``) and delivers
        everything after; a crash between the steps repeats events, never loses one."""
        if not (self.leading and hook.active and not hook.deleted and self._fast(hook)):
            return False
        js = self.store.js
        async with self._feed_lock:
            wanted = fanout_filters([hook.filters, *(self.hooks[w].filters for w in self.attached if w in self.hooks)])
            if self.feed_running:
                await self._widen_feed(wanted)
            head = await self.store.last_seq()
            info = await js.consumer_info(STREAM, consumer_name(hook.id))
            if info.num_pending or info.num_ack_pending:
                return False
            acked = max(info.ack_floor.stream_seq if info.ack_floor else 0, hook.start_seq - 1)
            if not self.feed_running:
                with contextlib.suppress(NotFoundError):  # left by a crash: its position is stale
                    await js.delete_consumer(STREAM, FANOUT_CONSUMER)
                await self._add_consumer(self._consumer_config(FANOUT_CONSUMER, FANOUT_DESCRIPTION, wanted,
                                                               max(acked, head) + 1))
            hook.skip_through = acked
            self.attached.add(hook.id)
            try:
                await self._write_attached()
                await js.delete_consumer(STREAM, consumer_name(hook.id))
            except BaseException:
                self.attached.discard(hook.id)  # still its own: a record saying otherwise loses to the consumer
                with contextlib.suppress(Exception):
                    await self._write_attached()
                raise
            if not self.feed_running:
                self._start_feed()
        log.info("webhook attached to the fan-out", extra={"webhook_id": hook.id, "after_seq": acked})
        return True

    async def _widen_feed(self, wanted: list[str] | None) -> None:
        """The running fan-out's filters grow to cover ``wanted`` (None: the whole stream). In
        place: the server keeps the consumer's position and hands it, from there on, the events
        the new filters match. Before the attaching webhook's ack floor is read: an event of it
        appended meanwhile is then either in that floor or after the widened position, never
        passed over by the narrower filters. (Filters do not shrink when webhooks leave: an event
        no attached webhook wants is only pulled and acked; the consumer goes with the last one.)"""
        def widened(current: list[str] | None) -> list[str] | None:
            return None if current is None or wanted is None else fanout_filters([current, wanted])

        if await self._update_consumer(FANOUT_CONSUMER, FANOUT_DESCRIPTION, widened):
            log.info("webhook fan-out updated", extra={"wanted": wanted or ["(the whole stream)"]})

    async def _update_consumer(self, name: str, description: str,
                               filters: Callable[[list[str] | None], list[str] | None] = lambda current: current
                               ) -> bool:
        """Update an existing consumer in place (the server keeps its position) when its filters
        (``filters`` of the current ones) or its ack wait differ from what this dispatcher wants:
        the leader's ``--webhook-ack-wait`` applies to every consumer it delivers from, also
        those created before the operator changed it. True if it changed anything; NotFoundError
        if there is no such consumer."""
        config = (await self.store.js.consumer_info(STREAM, name)).config
        current = config.filter_subjects or ([config.filter_subject] if config.filter_subject else None)
        wanted = filters(current)
        if wanted == current and abs((config.ack_wait or 0) - self.settings.ack_wait) < 1e-3:
            return False
        await self.store.js.add_consumer(STREAM, self._consumer_config(name, description, wanted,
                                                                       config.opt_start_seq or 1))
        return True

    def _fast(self, hook: Hook) -> bool:
        """Its last attempt succeeded within the patience (or it has none yet)."""
        history = self.logs.get(hook.id)
        last = history.attempts[-1] if history is not None and history.attempts else None
        return last is None or (last.error is None and last.latencyMs < self.settings.patience * 1000)

    async def _log(self, hook: Hook) -> DeliveryLog:
        history = self.logs.get(hook.id)
        if history is None:
            assert self.kv is not None
            kept = await self._until_it_works("read the delivery records", lambda: read_deliveries(self.kv, hook.id))
            history = self.logs.setdefault(hook.id, DeliveryLog(self.kv, hook.id, kept))
        return history

    # ---- delivering: the fan-out ---------------------------------------------------------------

    async def _feed(self) -> None:
        """One consumer, of the events the attached webhooks want, for all of them: one pull and
        one ack per event however many webhooks there are. Ends (removing the consumer) once none
        is left."""
        psub = await self.store.js.pull_subscribe_bind(FANOUT_CONSUMER, stream=STREAM)
        try:
            while True:
                try:
                    msgs = await psub.fetch(batch=1, timeout=FETCH_WAIT)
                except asyncio.TimeoutError:
                    msgs = []
                for msg in msgs or [None]:
                    async with self._feed_lock:
                        if msg is not None:
                            await self._fan_out(msg)
                        if not self.attached:
                            with contextlib.suppress(NotFoundError):
                                await self.store.js.delete_consumer(STREAM, FANOUT_CONSUMER)
                            self.feed_running = False
                            log.info("no webhook left on the fan-out: it stops")
                            return
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _fan_out(self, msg: Msg) -> None:
        """POST one event to every attached webhook it concerns, at once; wait at most the
        patience. A webhook that failed or has not answered by then is detached at this event
        (its unfinished attempt handed over), so it cannot hold the others back."""
        stored = decode(msg)
        if stored is None:  # a type this build does not know (logged by decode)
            await msg.ack()
            return
        heartbeat = Heartbeat(msg, max(self.settings.ack_wait / 3, 0.2))
        attempts: dict[str, asyncio.Task[DeliveryAttempt]] = {}
        handed: set[str] = set()
        try:
            targets = []
            for webhook_id in sorted(self.attached):
                hook = self.hooks.get(webhook_id)
                if (hook is not None and hook.active and not hook.deleted and stored.seq >= hook.start_seq
                        and stored.seq > hook.skip_through and subject_matches(msg.subject, hook.filters)
                        and (hook.sees_as is None or await self._visible(hook.sees_as, stored))):
                    targets.append(hook)
            if not targets:
                await msg.ack()
                return
            body = cloudevent_json(stored).encode()
            attempts = {hook.id: asyncio.create_task(self._attempt(hook, stored, 1, body)) for hook in targets}
            await asyncio.wait(attempts.values(), timeout=self.settings.patience)
            for hook in targets:
                task = attempts[hook.id]
                if not task.done():
                    handed.add(hook.id)
                    await self._detach(hook, stored.seq, Handover(stored.seq, task),
                                       f"no answer within {self.settings.patience:g}s")
                    continue
                attempt = task.result()
                await (await self._log(hook)).add(attempt)
                if attempt.error is not None:
                    await self._detach(hook, stored.seq, Handover(stored.seq, None), attempt.error)
            await msg.ack()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            for webhook_id, task in attempts.items():
                if webhook_id not in handed:
                    task.cancel()
            raise
        finally:
            heartbeat.cancel()

    # ---- delivering: a detached webhook --------------------------------------------------------

    async def _deliver(self, hook: Hook) -> None:
        """Its own consumer until the webhook is disabled or attached to the fan-out again."""
        try:
            await self._update_consumer(consumer_name(hook.id), _own_description(hook.id))
        except NotFoundError:  # a new webhook; or an attached one whose fan-out consumer was lost: after what it had
            await self._own_consumer(hook, max(hook.start_seq, hook.skip_through + 1))
        psub = await self.store.js.pull_subscribe_bind(consumer_name(hook.id), stream=STREAM)
        history = await self._log(hook)
        log.info("delivering webhook on its own consumer", extra={"webhook_id": hook.id, "url": hook.url})
        try:
            while True:
                try:
                    msgs = await psub.fetch(batch=1, timeout=FETCH_WAIT)
                except asyncio.TimeoutError:
                    if await self._try_attach(hook):
                        return
                    continue
                for msg in msgs:
                    if not await self._deliver_one(hook, msg, history):
                        return
                    if msg.metadata.num_pending == 0 and await self._try_attach(hook):
                        return
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _deliver_one(self, hook: Hook, msg: Msg, history: DeliveryLog) -> bool:
        """Deliver one event until a 2xx (then ack it: True) or until the webhook is disabled
        (then hand it back, to be the first delivered when it is enabled: False)."""
        stored = decode(msg)
        if stored is None:  # a type this build does not know (logged by decode)
            await self._ack(msg)
            return True
        if hook.sees_as is not None and not await self._visible(hook.sees_as, stored):
            await self._ack(msg)  # not the member's to see: passed over, not delivered
            return True
        heartbeat = Heartbeat(msg, max(self.settings.ack_wait / 3, 0.2))
        try:
            failures = 0
            handover, hook.handover = hook.handover, None
            if handover is not None:  # the fan-out's first attempt at the event it detached at
                handed = await handover.attempt if handover.attempt is not None else None
                if handed is not None:
                    await history.add(handed)  # (a finished one the fan-out recorded itself)
                if handover.seq == stored.seq:
                    if handed is not None and handed.error is None:
                        await self._ack(msg)
                        return True
                    failures = 1
            while True:
                if failures:
                    if failures >= self.settings.max_failures:
                        await self._disable(hook, stored, failures, history.attempts[-1].error or "")
                        await msg.nak()
                        return False
                    await asyncio.sleep(self._backoff(failures))
                attempt = await self._attempt(hook, stored, failures + 1)
                await history.add(attempt)
                if attempt.error is None:
                    await self._ack(msg)
                    return True
                failures += 1
        except BaseException:
            # stopping (or a broken connection): hand the event back now rather than after ack_wait
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise
        finally:
            heartbeat.cancel()

    @staticmethod
    async def _ack(msg: Msg) -> None:
        """Not ack_sync while more are pending: with max_ack_pending=1 the server hands out the
        next event only once it has this ack, and a lost ack is a redelivery, which at least once
        allows. The last one is confirmed, because an attach reads the ack floor right after."""
        if msg.metadata.num_pending == 0:
            await msg.ack_sync()
        else:
            await msg.ack()

    async def _visible(self, who: Principal, stored: StoredEvent) -> bool:
        event = stored.event
        owner = None
        if isinstance(event, RunEvent):
            if event.run_id not in self._run_owners:
                created = await self.store.read(f"{SUBJECT_PREFIX}.run.{event.run_id}.{RunCreated.event_type}")
                first = created[0].event if created else None
                self._run_owners[event.run_id] = first.owner if isinstance(first, RunCreated) else None
            owner = self._run_owners[event.run_id]
        return may_see(who, event.aggregate, owner)

    async def _attempt(self, hook: Hook, stored: StoredEvent, n: int, body: bytes | None = None) -> DeliveryAttempt:
        """One signed POST; never raises for the receiver's or the network's failures. ``body``:
        the CloudEvent, when the caller rendered it once for several webhooks."""
        assert self.http is not None
        if body is None:
            body = cloudevent_json(stored).encode()
        status: int | None = None
        error: str | None = None
        outcome = "unreachable"  # the metric's label (mlynar_webhook_deliveries_total)
        start = time.monotonic()
        try:
            secrets = [await self._secret(ref) for ref in hook.signing_refs(datetime.now(timezone.utc))]
            timestamp = int(time.time())
            headers = {
                "Content-Type": CONTENT_TYPE,
                "webhook-id": stored.envelope.id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": signature(secrets, stored.envelope.id, timestamp, body),
            }
            await check_target(hook.url, self.allow_private)  # again: DNS may have changed
            async with self.http.post(hook.url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except (WebhookRuleError, SecretMissing) as exc:
            error, outcome = str(exc), "refused"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            error = _describe(exc, self.settings.timeout)
        latency = (time.monotonic() - start) * 1000
        if error is None or status is not None:
            outcome = "delivered" if error is None else "http_error"
        metrics.WEBHOOK_DELIVERIES.labels(outcome).inc()
        metrics.WEBHOOK_DELIVERY_DURATION.labels(outcome).observe(latency / 1000)
        if error is not None:
            log.info("webhook delivery failed",
                     extra={**_log_context(hook, stored), "attempt": n, "status": status, "error": error})
        elif log.isEnabledFor(logging.DEBUG):  # (a thousand a second: no context built for nothing)
            log.debug("webhook delivered",
                      extra={**_log_context(hook, stored), "status": status, "latency_ms": round(latency, 1)})
        # built from values of the right types: validating them again is CPU the append path shares
        return DeliveryAttempt.model_construct(
            eventId=stored.envelope.id, type=stored.event.event_type, sequence=stored.seq, attempt=n,
            statusCode=status, latencyMs=round(latency, 2), error=error, at=datetime.now(timezone.utc))

    async def _secret(self, ref: str) -> str:
        value = self._secret_values.get(ref)
        if value is None:
            value = await self.secrets.get(ref)
            if value is None:
                raise SecretMissing("the webhook's signing secret is missing from the secret store")
            self._secret_values[ref] = value
        return value

    async def _disable(self, hook: Hook, stored: StoredEvent, failures: int, error: str) -> None:
        """Append ``WebhookDisabled`` (retried until it lands; its id is derived from the epoch, so
        a retry or a second replica appends it once)."""
        event = WebhookDisabled(webhook_id=hook.id, failures=failures, error=error, event_id=stored.envelope.id,
                                sequence=stored.seq)
        msg_id = str(uuid.uuid5(DISABLED_IDS, f"{hook.id}/{hook.epoch}"))
        tries = 0
        while True:
            try:
                ack = await self.store.append(event, actor=ACTOR, msg_id=msg_id)
                if not ack.duplicate:
                    metrics.WEBHOOKS_DISABLED.inc()
                break
            except Exception:  # noqa: BLE001 - NATS unreachable: keep holding the event and try again
                tries += 1
                log.warning("could not mark the webhook failing; retrying", exc_info=True,
                            extra={"webhook_id": hook.id})
                await asyncio.sleep(self._backoff(tries))
        hook.active = False  # at once, before the fold sees it: no task is restarted meanwhile
        log.warning("webhook failing: delivery stopped until it is enabled",
                    extra={**_log_context(hook, stored), "failures": failures, "error": error})

    def _backoff(self, failures: int) -> float:
        """Exponential from ``retry_base``, capped at ``retry_cap``, with jitter (50-100 %) so
        webhooks failing at once against one receiver do not retry in lockstep."""
        s = self.settings
        return min(s.retry_cap, s.retry_base * 2 ** min(failures - 1, 32)) * random.uniform(0.5, 1.0)


async def _wait_out(tasks: set[asyncio.Future], timeout: float = 5.0, cancel: bool = True) -> None:
    """Cancel ``tasks`` (unless not ``cancel``: work to finish, such as a last write) and wait
    until they end, however often this coroutine is cancelled meanwhile: the host cancels a
    stopping role again every 0.2 s (``tasks.cancel_and_wait``), and a delivery cut short of its
    ``nak`` would hold its event for the whole ack-wait after a restart. A task still running
    after ``timeout`` is left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for task in pending if cancel else ():
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=0.2)
        except asyncio.CancelledError:
            continue


def _own_description(webhook_id: str) -> str:
    return f"deliveries of webhook {webhook_id}"


def _log_context(hook: Hook, stored: StoredEvent) -> dict[str, Any]:
    context: dict[str, Any] = {"webhook_id": hook.id, "event_id": stored.envelope.id, "seq": stored.seq,
                               "type": stored.event.event_type}
    run_id = getattr(stored.event, "run_id", None)
    if run_id is not None:
        context["run_id"] = run_id
    return context
