"""The webhook dispatcher: POSTs every event a webhook subscribed to, as a signed CloudEvent.

Why it is built this way:

* **At least once, in order, across outages and restarts.** Each webhook has its own durable
  JetStream consumer (:func:`mlynar_events.webhooks.consumer_name`), filtered by its
  types/runs, starting right after the webhook's ``WebhookCreated``, with explicit acks and
  ``max_ack_pending=1``: the server hands out the next event only after the previous one was
  acked, so delivery is serial per webhook even with several dispatcher replicas, and the
  position survives anything because it is the server's. An event is acked only after a 2xx.
  While it is being retried its message is held (``in_progress`` heartbeats, so another
  replica does not take it over); a dispatcher that stops hands it back at once (a nak), one
  that dies loses it to ``--webhook-ack-wait``. A receiver may see an event twice (the same
  ``webhook-id``, e.g. when an ack was lost), never out of order and never missing.
* **Failing.** Retries back off exponentially up to ``--webhook-retry-cap``; after
  ``--webhook-max-failures`` consecutive failures the dispatcher appends ``WebhookDisabled`` and
  stops pulling. The failed event stays unacked in the consumer, so ``WebhookEnabled`` resumes
  exactly there. (The count of consecutive failures starts again when a dispatcher restarts.)
* **SSRF.** The target is checked again before every attempt, and the HTTP client connects only
  to addresses that pass (:class:`mlynar_events.webhooks.GuardedResolver`); redirects are not
  followed, proxies from the environment are not used.
* **What it records.** The last attempts per webhook go to the KV bucket
  ``mlynar-webhook-deliveries``, where the API reads them: the roles meet on NATS only. A failed
  attempt is written at once; successes at most every :data:`RECORD_EVERY` per webhook
  (:class:`DeliveryLog`), because a write per delivery is a JetStream write per delivery on the
  server the appends go to, and the records are a view, not the position.

The dispatcher folds the webhook events from sequence 1 and keeps one delivery task per active
webhook; a deleted webhook's consumer and records are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
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
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KeyValue

from mlynar_events import metrics
from mlynar_events.cloudevents import CONTENT_TYPE, cloudevent_json
from mlynar_events.config import WebhookSettings
from mlynar_events.events import (
    STREAM, SUBJECT_PREFIX, RunCreated, RunEvent, StoredEvent, WebhookCreated, WebhookDeleted, WebhookDisabled,
    WebhookEnabled,
    WebhookSecretRotated, subject_filters,
)
from mlynar_events.principals import Principal, Role, may_see
from mlynar_events.secrets import SecretStore
from mlynar_events.store import EventStore, decode
from mlynar_events.tasks import cancel_and_wait
from mlynar_events.webhooks import (
    KEPT_DELIVERIES, DeliveryAttempt, GuardedResolver, WebhookRuleError, check_target, consumer_name,
    deliveries_bucket, deliveries_json, delivery_filters, read_deliveries, signature,
)

log = logging.getLogger("mlynar.webhooks")
T = TypeVar("T")

ACTOR = "webhooks"
DISABLED_IDS = uuid.UUID("0d7c2a4e-31f5-4c43-9a57-5c1b1d7e6f21")
FETCH_WAIT = 5.0
"""Seconds one pull request waits on the server for the next event (it returns at once when
one arrives; this only bounds how often an idle webhook's task wakes up)."""
RECORD_EVERY = 0.25
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

    def signing_refs(self, now: datetime) -> list[str]:
        """The current secret, and the previous one during its grace period."""
        if self.previous_ref and self.grace_until and now < self.grace_until:
            return [self.secret_ref, self.previous_ref]
        return [self.secret_ref]


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
        self._dirty: set[str] = set()
        self._secret_values: dict[str, str] = {}  # a reference names one value forever: never stale
        self._run_owners: dict[str, str | None] = {}  # run id -> owner (a run's owner never changes)
        self.kv: KeyValue | None = None
        self.http: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        self.kv = await self._until_it_works("open the delivery records bucket",
                                             lambda: deliveries_bucket(self.store.js, self.store.replicas))
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.allow_private)),
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout), trust_env=False)
        try:
            sub = await self._until_it_works("follow the webhook events",
                                             lambda: self.store.subscribe(subject_filters(self.CONSUMES)))
        except BaseException:
            await self.http.close()
            raise
        log.info("webhook dispatcher started", extra={"allow_private": self.allow_private})
        try:
            async for stored in sub:
                self.apply(stored)
                if sub.pending == 0:  # caught up: act on the folded state, not on each step of history
                    await self._reconcile()
        finally:
            await self._stop_deliveries()
            await sub.close()
            await self.http.close()

    async def _stop_deliveries(self, timeout: float = 5.0) -> None:
        """Cancel every delivery task and wait until each has handed its event back (``nak``),
        while the connection is still open. The host cancels this role again every 0.2 s until
        it ends (``tasks.cancel_and_wait``); those cancellations must not cut this wait short, or
        the store closes under a delivery still holding its event, which then waits the whole
        ack-wait to be redelivered after a restart."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = {t for t in self.tasks.values() if not t.done()}
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            try:
                _, pending = await asyncio.wait(pending, timeout=0.2)
            except asyncio.CancelledError:
                continue  # the host's repeated cancellation: the role ends once this is done

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
        """One delivery task per active webhook; none for a failing or deleted one."""
        dirty, self._dirty = self._dirty, set()
        for webhook_id in sorted(dirty):
            hook = self.hooks.get(webhook_id)
            if hook is None:
                continue
            task = self.tasks.get(webhook_id)
            if hook.active and not hook.deleted:
                if task is None or task.done():
                    self.tasks[webhook_id] = asyncio.create_task(self._deliver_forever(hook),
                                                                 name=f"webhook-{webhook_id}")
            elif task is not None:
                await cancel_and_wait([task])
                del self.tasks[webhook_id]
            if hook.deleted:
                await self._forget(hook)
                del self.hooks[webhook_id]

    async def _forget(self, hook: Hook) -> None:
        """A deleted webhook's consumer and records go (idempotent: replicas and replays race)."""
        with contextlib.suppress(NotFoundError, APIError):
            await self.store.js.delete_consumer(STREAM, consumer_name(hook.id))
        if self.kv is not None:
            with contextlib.suppress(Exception):
                await self.kv.purge(hook.id)
        log.info("webhook deleted: its consumer and delivery records removed", extra={"webhook_id": hook.id})

    # ---- delivering ---------------------------------------------------------------------------

    async def _deliver_forever(self, hook: Hook) -> None:
        """:meth:`_deliver` until the webhook is disabled; a broken connection or JetStream error
        restarts it after a pause (the position is the consumer's, so nothing is lost)."""
        failures = 0
        while True:
            try:
                await self._deliver(hook)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.store.nc.is_closed:
                    # the service is stopping (a cancellation nats-py's wait_for swallowed, gh-86296,
                    # must not leave this loop retrying forever on a closed connection)
                    return
                failures += 1
                log.exception("webhook delivery loop failed; restarting it", extra={"webhook_id": hook.id})
                await asyncio.sleep(self._backoff(failures))

    async def _ensure_consumer(self, hook: Hook) -> str:
        name = consumer_name(hook.id)
        await self.store.js.add_consumer(STREAM, js_api.ConsumerConfig(
            durable_name=name,
            description=f"deliveries of webhook {hook.id}",
            filter_subject=hook.filters[0] if len(hook.filters) == 1 else None,
            filter_subjects=hook.filters if len(hook.filters) > 1 else None,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=hook.start_seq,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            max_ack_pending=1,
        ))
        return name

    async def _deliver(self, hook: Hook) -> None:
        psub = await self.store.js.pull_subscribe_bind(await self._ensure_consumer(hook), stream=STREAM)
        assert self.kv is not None
        history = DeliveryLog(self.kv, hook.id, await read_deliveries(self.kv, hook.id))
        log.info("delivering webhook", extra={"webhook_id": hook.id, "url": hook.url})
        try:
            while True:
                try:
                    msgs = await psub.fetch(batch=1, timeout=FETCH_WAIT)
                except asyncio.TimeoutError:
                    continue
                for msg in msgs:
                    if not await self._deliver_one(hook, msg, history):
                        return
        finally:
            with contextlib.suppress(Exception, asyncio.CancelledError):  # the connection may be closing already
                await asyncio.shield(history.close())
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _deliver_one(self, hook: Hook, msg: Msg, history: DeliveryLog) -> bool:
        """Deliver one event until a 2xx (then ack it: True) or until the webhook is disabled
        (then hand it back, to be the first delivered when it is enabled: False)."""
        stored = decode(msg)
        if stored is None:  # a type this build does not know (logged by decode)
            await msg.ack()
            return True
        if hook.sees_as is not None and not await self._visible(hook.sees_as, stored):
            await msg.ack()  # not the member's to see: passed over, not delivered
            return True
        heartbeat = Heartbeat(msg, max(self.settings.ack_wait / 3, 0.2))
        try:
            failures = 0
            while True:
                attempt = await self._attempt(hook, stored, failures + 1)
                await history.add(attempt)
                if attempt.error is None:
                    # not ack_sync: with max_ack_pending=1 the server hands out the next event only
                    # once it has this ack, and a lost ack is a redelivery, which at least once allows
                    await msg.ack()
                    return True
                failures += 1
                if failures >= self.settings.max_failures:
                    await self._disable(hook, stored, failures, attempt.error)
                    await msg.nak()
                    return False
                await asyncio.sleep(self._backoff(failures))
        except BaseException:
            # stopping (or a broken connection): hand the event back now rather than after ack_wait
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise
        finally:
            heartbeat.cancel()

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

    async def _attempt(self, hook: Hook, stored: StoredEvent, n: int) -> DeliveryAttempt:
        """One signed POST; never raises for the receiver's or the network's failures."""
        assert self.http is not None
        context = _log_context(hook, stored)
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
        if error is None:
            log.debug("webhook delivered", extra={**context, "status": status, "latency_ms": round(latency, 1)})
        else:
            log.info("webhook delivery failed", extra={**context, "attempt": n, "status": status, "error": error})
        return DeliveryAttempt(eventId=stored.envelope.id, type=stored.event.event_type, sequence=stored.seq,
                               attempt=n, statusCode=status, latencyMs=round(latency, 2), error=error,
                               at=datetime.now(timezone.utc))

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


def _log_context(hook: Hook, stored: StoredEvent) -> dict[str, Any]:
    context: dict[str, Any] = {"webhook_id": hook.id, "event_id": stored.envelope.id, "seq": stored.seq,
                               "type": stored.event.event_type}
    run_id = getattr(stored.event, "run_id", None)
    if run_id is not None:
        context["run_id"] = run_id
    return context
