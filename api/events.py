"""The event interface of the API: the stream itself, live and resumable, and a run's history.

* ``GET /api/events`` — Server-Sent Events: every event (optionally only ``?run=`` runs and
  ``?type=`` types, both repeatable), each as ``id: <stream sequence>``, ``event: <type>`` and
  ``data:`` one CloudEvent (:mod:`mlynar_events.cloudevents`). A client that reconnects with
  ``Last-Event-ID`` (or ``?after=<seq>``) gets every event after that one: the stream sequence
  is the position, so resuming is exact (none twice, none missing), also across a restart of
  the service. A comment line every ``--sse-heartbeat`` seconds keeps proxies from closing an
  idle stream.
* ``GET /api/run/{id}/events`` — the same for one run; with ``Accept: text/event-stream`` it
  ends after the run's final event (completed, terminated or deleted, with nothing after it),
  otherwise it answers the history as JSON.
* ``GET /api/run/{id}/history`` — the run's events as JSON (``?after=&limit=`` pages), and
  ``GET /api/run/{id}?at=<seq>`` — the run as it was right after event ``seq``.

Each subscriber has its own ordered JetStream consumer starting at its position: the stream is
the buffer, so a slow client holds back nobody else and a fast one sees an append as soon as
NATS delivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from mlynar_events.cloudevents import cloudevent, cloudevent_json
from mlynar_events.errors import NotFound
from mlynar_events.events import (
    CATALOGUE, SUBJECT_PREFIX, RunCompleted, RunDeleted, RunTerminated, StoredEvent, key_filter, subject_filters,
)

from projections.history import run_body_at

from .context import ctx
from .errors import BadRequest
from .principal import AccessRevoked, event_visibility, route_run, token_check
from .render import base_url

log = logging.getLogger("mlynar.api.events")

MAX_FILTER_RUNS = 100
FINAL = (RunCompleted, RunTerminated, RunDeleted)
QUEUE = 256
"""Events read ahead of a slow client; beyond that the consumer waits (NATS holds the rest)."""
DISCONNECT_CHECK = 1.0
"""Seconds between checks that the client is still there while nothing is sent, so a closed
stream frees its consumer within a second, not at the next heartbeat."""
STREAMS: web.AppKey[set[asyncio.Task]] = web.AppKey("event-streams", set)


async def close_streams(app: web.Application) -> None:
    """``on_shutdown``: end every open event stream now, so stopping the service does not wait
    for clients that never hang up (aiohttp's advice for long-lived responses), and stop the hub."""
    for task in list(app[STREAMS]):
        task.cancel()
    await app[HUB].close()


class HistoryEvent(BaseModel):
    """One entry of a run's history: the audit record of one event."""

    sequence: int
    id: str
    type: str
    time: str
    actor: str
    data: dict[str, Any]


class History(BaseModel):
    events: list[HistoryEvent]
    next: int | None
    """``?after=`` for the next page; null when this page reached the end of the history."""


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


def _position(request: web.Request) -> int:
    """Where to resume: ``Last-Event-ID`` (what EventSource sends on reconnect) wins over ``?after``."""
    last = request.headers.get("Last-Event-ID")
    if last is not None and last.strip():
        try:
            value = int(last)
        except ValueError:
            raise BadRequest("Last-Event-ID must be a stream sequence (an integer)") from None
        if not 0 <= value < 2**63:
            raise BadRequest("Last-Event-ID out of range")
        return value
    return _int_query(request, "after", 0, 0, 2**63 - 1)


def _run_ids(values: list[str]) -> list[str]:
    if len(values) > MAX_FILTER_RUNS:
        raise BadRequest(f"at most {MAX_FILTER_RUNS} run filters")
    out = []
    for value in values:
        try:
            out.append(str(uuid.UUID(value)))
        except ValueError:
            raise BadRequest(f"run {value!r} is not a run id") from None
    return out


def _types(values: list[str]) -> list[type]:
    unknown = sorted(set(values) - set(CATALOGUE))
    if unknown:
        raise BadRequest(f"unknown event type(s) {unknown}", {"known": sorted(CATALOGUE)})
    return [CATALOGUE[v] for v in dict.fromkeys(values)]


def stream_filters(runs: list[str], types: list[type]) -> list[str] | None:
    """NATS subject filters for the ``run``/``type`` query; None when nothing can match (types
    of no run given with a run filter)."""
    if not runs:
        return subject_filters(types) if types else [f"{SUBJECT_PREFIX}.>"]
    run_types = [t for t in types if t.aggregate == "run"]
    if types and not run_types:
        return None
    if not run_types:
        return [key_filter("run", r) for r in runs]
    return [f"{SUBJECT_PREFIX}.run.{r}.{t.event_type}" for r in runs for t in run_types]


_RENDERED: OrderedDict[tuple[int, str], bytes] = OrderedDict()
RENDERED_CACHE = 4096
"""Rendered messages kept by sequence: every subscriber of a live stream is sent the same bytes,
so an event is rendered once per process, not once per subscriber (with 200 subscribers the
rendering was most of the work)."""


def _sse_message(stored: StoredEvent) -> bytes:
    key = (stored.seq, stored.envelope.id)  # the id too: one process may follow several streams (tests)
    message = _RENDERED.get(key)
    if message is None:
        message = f"id: {stored.seq}\nevent: {stored.event.event_type}\ndata: {cloudevent_json(stored)}\n\n".encode()
        _RENDERED[key] = message
        if len(_RENDERED) > RENDERED_CACHE:
            _RENDERED.popitem(last=False)
    return message


def subject_matches(subject: str, pattern: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` the rest."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for i, w in enumerate(wanted):
        if w == ">":
            return len(tokens) > i
        if i >= len(tokens) or (w != "*" and w != tokens[i]):
            return False
    return len(tokens) == len(wanted)


class Listener:
    """One subscriber of the hub: the events after ``since`` that match its filters, queued."""

    def __init__(self, filters: list[str], since: int, after: int) -> None:
        self.filters = filters
        self.since = since
        self.after = after  # the client has everything up to here (it may be ahead of the hub)
        self.queue: asyncio.Queue[StoredEvent | None] = asyncio.Queue(QUEUE)
        self.overflowed = False

    def offer(self, stored: StoredEvent) -> None:
        if self.overflowed or stored.seq <= self.after or not any(subject_matches(stored.subject, f)
                                                                  for f in self.filters):
            return
        try:
            self.queue.put_nowait(stored)
        except asyncio.QueueFull:  # a client this slow is dropped; it resumes with Last-Event-ID
            self.overflowed = True
            self.queue = asyncio.Queue(1)
            self.queue.put_nowait(None)


class EventHub:
    """One live subscription of the whole stream per API process, fanned out to every event
    stream: an event is read from NATS and decoded once however many clients follow it (a
    consumer per client made NATS send, and Python decode, every event once per client)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.position = 0
        self.listeners: set[Listener] = set()
        self._task: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None

    async def ensure_started(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.ensure_future(self._follow())
        await asyncio.shield(self._ready)

    async def _follow(self) -> None:
        assert self._ready is not None
        try:
            self.position = await self.store.last_seq()
            sub = await self.store.subscribe([f"{SUBJECT_PREFIX}.>"], self.position + 1)
        except BaseException as exc:
            self._ready.set_exception(exc)
            self._ready, self._task = None, None
            raise
        self._ready.set_result(None)
        try:
            async for stored in sub:
                self.position = stored.seq
                for listener in list(self.listeners):
                    listener.offer(stored)
        finally:
            await sub.close()
            for listener in list(self.listeners):  # their streams end; clients resume
                listener.overflowed = True
                with contextlib.suppress(asyncio.QueueFull):
                    listener.queue.put_nowait(None)

    def register(self, filters: list[str], after: int) -> Listener:
        listener = Listener(filters, self.position, after)
        self.listeners.add(listener)
        return listener

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


HUB: web.AppKey[EventHub] = web.AppKey("event-hub", EventHub)
HISTORY_READ = 10_000
"""A stream that starts at most this far behind the hub reads that part with one read and then
follows the hub; one further behind gets a consumer of its own (so a client asking for the
whole history is streamed it, not sent a list built in memory)."""


async def _history(store: Any, filters: list[str], after: int, upto: int) -> list[StoredEvent]:
    """The events matching ``filters`` in ``(after, upto]``, in order."""
    found: dict[int, StoredEvent] = {}
    for f in filters:
        for stored in await store.read(f, after + 1):
            if after < stored.seq <= upto:
                found[stored.seq] = stored
    return [found[k] for k in sorted(found)]


async def _stream(request: web.Request, filters: list[str] | None, after: int,
                  run_id: str | None = None) -> web.StreamResponse:
    """Write the events after ``after`` matching ``filters`` as SSE until the client goes away
    (or, for one run, until its final event)."""
    c = ctx(request)
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await resp.prepare(request)
    if filters is None:
        await resp.write(b": nothing can match these filters\n\n")
        await resp.write_eof()
        return resp
    hub = request.app[HUB]
    await hub.ensure_started()
    listener: Listener | None = None
    sub = None
    reader: asyncio.Task | None = None
    if hub.position - after <= HISTORY_READ:
        listener = hub.register(filters, after)
        backlog = await _history(c.store, filters, after, listener.since) if after < listener.since else []
        queue = listener.queue
    else:  # far behind: a consumer of its own from there on
        backlog = []
        queue = asyncio.Queue(QUEUE)
        sub = await c.store.subscribe(filters, after + 1)

        async def pump() -> None:
            async for stored in sub:
                await queue.put(stored)

        reader = asyncio.ensure_future(pump())
    heartbeat = c.settings.sse_heartbeat
    loop = asyncio.get_running_loop()
    streams = request.app[STREAMS]
    me = asyncio.current_task()
    assert me is not None
    streams.add(me)

    visible = event_visibility(request)
    token_valid = token_check(request)

    async def send(stored: StoredEvent) -> bool:
        """Write one event (if the caller may see it); True when the run's stream is over."""
        if visible is None or await visible(stored):
            await resp.write(_sse_message(stored))
        return run_id is not None and isinstance(stored.event, FINAL) and queue.empty() \
            and (await c.runs.get(run_id)).version <= stored.seq

    try:
        await resp.write(b"retry: 1000\n: connected\n\n")
        done = False
        for stored in backlog:
            if done := await send(stored):
                break
        quiet_since = loop.time()
        while not done:
            try:
                if queue.empty():
                    # asyncio.timeout, not wait_for: no task per wait (with 200 streams, one per event each)
                    async with asyncio.timeout(min(heartbeat, DISCONNECT_CHECK)):
                        item = await queue.get()
                else:
                    item = queue.get_nowait()
            except TimeoutError:
                if reader is not None and reader.done():
                    reader.result()  # the subscription ended: say why (logged below)
                    break
                if request.transport is None or request.transport.is_closing():
                    log.debug("event stream closed", extra={"run_id": run_id})
                    break  # the client went away while nothing was to be sent
                if loop.time() - quiet_since >= heartbeat:
                    if token_valid is not None:  # an idle stream of a revoked token ends here, not at an event
                        await token_valid()
                    await resp.write(b": heartbeat\n\n")
                    quiet_since = loop.time()
                continue
            if item is None:  # too slow for the hub, or the hub stopped: the client resumes
                log.info("event stream ended: the client fell behind", extra={"run_id": run_id})
                break
            done = await send(item)
            quiet_since = loop.time()
    except (ConnectionResetError, asyncio.CancelledError):
        # the client went away (or the service stops, :func:`close_streams`): not an error
        log.debug("event stream closed", extra={"run_id": run_id})
    except AccessRevoked as exc:  # nothing more for it; reconnecting with it is a 403
        log.info("event stream ended: %s", exc, extra={"run_id": run_id})
    finally:
        streams.discard(me)
        if listener is not None:
            hub.listeners.discard(listener)
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        if sub is not None:
            await sub.close()
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


def _wants_sse(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


async def events(request: web.Request) -> web.StreamResponse:
    runs = _run_ids(request.query.getall("run", []))
    types = _types(request.query.getall("type", []))
    return await _stream(request, stream_filters(runs, types), _position(request))


async def run_events(request: web.Request) -> web.StreamResponse:
    run_id = await route_run(request)
    types = _types(request.query.getall("type", []))
    if not _wants_sse(request):
        return await history(request, types)
    after = _position(request)
    if not (await ctx(request).runs.get(run_id)).version:
        raise NotFound(f"run {run_id!r} does not exist")
    return await _stream(request, stream_filters([run_id], types), after, run_id)


async def history(request: web.Request, types: list[type] | None = None) -> web.Response:
    """The run's events in order, as the audit trail: who (``actor``) did what, when (only
    those of ``types`` when given: ``/events?type=`` without ``Accept: text/event-stream``)."""
    c = ctx(request)
    run_id = await route_run(request)
    after = _position(request)
    limit = _int_query(request, "limit", 1000, 1, 10_000)
    events = [e for e in await c.store.read(key_filter("run", run_id), after + 1) if e.seq > after]
    if not events and not after:
        raise NotFound(f"run {run_id!r} has no history")
    if types:
        events = [e for e in events if type(e.event) in types]
    page = events[:limit]
    body = History(
        events=[HistoryEvent(sequence=e.seq, id=e.envelope.id, type=e.event.event_type,
                             time=cloudevent(e)["time"], actor=e.envelope.actor,
                             data=e.event.model_dump(mode="json")) for e in page],
        next=page[-1].seq if len(events) > limit else None,
    )
    return web.json_response(body.model_dump(mode="json"))


async def run_at(request: web.Request) -> web.Response:
    """``GET /api/run/{id}?at=<seq>``: the run as it was right after event ``seq``, folded from
    the history (:func:`projections.history.run_body_at`), in the live view's shape."""
    c = ctx(request)
    run_id = await route_run(request)
    head = await c.store.last_seq()
    at = _int_query(request, "at", head, 1, 2**63 - 1)
    if at > head:
        raise NotFound(f"the stream has no event {at} yet (its last is {head})", {"head": head})
    body = await run_body_at(c.store, run_id, at, base_url(request, c))
    if body is None:
        raise NotFound(f"run {run_id!r} did not exist at sequence {at}")
    return web.Response(text=body, content_type="application/json")
