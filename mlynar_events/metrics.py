"""The Prometheus metrics of this process: one registry (:data:`REGISTRY`), every metric object
defined here, each with who updates it. ``docs/METRICS.md`` is the user's page of the same list.

Every role updates the metrics of what it does, in its own process; a process exposes them at
``/metrics``: the API on its own port (``api/metrics.py``), any process on ``--metrics-port``
(:func:`start_server`). Prometheus adds ``instance``/``pod``, so "per executor" or "per
replica" is the scrape target, never a label here.

**Labels are bounded**: operator, machine, event type, route template, status, outcome, cause.
Never a run, step, unit or webhook id, never a raw path (an unbounded label is a memory leak in
this process and in Prometheus).

Two kinds of values are read when scraped instead of being kept up to date:

* :class:`Sampled` gauges ask their live sources (the solver's waiting input sets, the
  executors' running steps) at collection time;
* :func:`on_scrape` hooks (async) run before each exposition, for what needs a round trip
  (the projector's lag needs the stream's head from NATS).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, Awaitable, Callable, Iterable

from prometheus_client import (
    CollectorRegistry, Counter, GCCollector, Gauge, Histogram, PlatformCollector, ProcessCollector,
    disable_created_metrics, generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("mlynar.metrics")

disable_created_metrics()  # no `*_created` series: half the output, and nothing reads them
REGISTRY = CollectorRegistry()
"""The one registry of this process (not prometheus-client's global one, so a library's metrics
never appear by accident)."""
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format, which every Prometheus version scrapes."""

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Buckets of short waits: a request, an append, a scheduling decision, a webhook POST."""
STEP_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0)
"""Buckets of a step's duration: from a fraction of a second to hours."""

KUBERNETES = "kubernetes"
"""The ``machine`` label of a step without ``spec.machine`` (a Kubernetes Job)."""


def machine_label(machine: str | None) -> str:
    return machine or KUBERNETES


# ---- the executor (executors/worker.py, through executors/metrics.py) --------------------------

STEPS_STARTED = Counter(
    "mlynar_steps_started", "Steps whose first attempt an executor started (a re-attach after a "
    "crash is not a start)", ["operator", "machine"], registry=REGISTRY)
STEPS_FINISHED = Counter(
    "mlynar_steps_finished", "Steps ended by an executor, by outcome: success, failure, cancelled",
    ["operator", "machine", "outcome"], registry=REGISTRY)
STEP_DURATION = Histogram(
    "mlynar_step_duration_seconds", "A step from its start (or its re-attach by the executor that "
    "finished it) to its outcome, retries and their backoff included", ["operator", "machine", "outcome"],
    buckets=STEP_SECONDS, registry=REGISTRY)
STEP_ATTEMPTS = Counter(
    "mlynar_step_attempts", "Attempts started (the first and every retry)", ["operator", "machine"],
    registry=REGISTRY)
STEP_ATTEMPT_FAILURES = Counter(
    "mlynar_step_attempt_failures", "Attempts that failed, by cause: operator (its own failure, "
    "counts against spec.retries) or infrastructure (agent lost, blob store failing)",
    ["operator", "machine", "cause"], registry=REGISTRY)
STEP_RETRIES = Counter(
    "mlynar_step_retries", "Failed attempts that are retried (StepAttemptFailed), by cause",
    ["operator", "machine", "cause"], registry=REGISTRY)

# ---- the solver (mlynar_events/solver.py) ------------------------------------------------------

STEPS_SCHEDULED = Counter(
    "mlynar_steps_scheduled", "StepScheduled appended by this solver", ["operator"], registry=REGISTRY)
SCHEDULING_LATENCY = Histogram(
    "mlynar_scheduling_latency_seconds", "From the event that made an input set schedulable (its "
    "newest DataUnitAdded, or RunStarted when the units were there before the start) to its "
    "StepScheduled; a set that waited for maxParallel includes the wait",
    ["operator"], buckets=SECONDS, registry=REGISTRY)

# ---- the event store (mlynar_events/store.py) --------------------------------------------------

EVENTS_APPENDED = Counter(
    "mlynar_events_appended", "Events appended to the stream by this process (duplicates not "
    "counted)", ["type"], registry=REGISTRY)
EVENT_DUPLICATES = Counter(
    "mlynar_event_append_duplicates", "Appends JetStream answered as a duplicate (the same fact "
    "appended before, by a retry or another replica)", ["type"], registry=REGISTRY)
EVENT_APPEND_ERRORS = Counter(
    "mlynar_event_append_errors", "Appends that failed, by error: conflict (the aggregate moved "
    "on; the caller decides again), unavailable (JetStream did not answer within the retries), "
    "refused (any other JetStream answer)", ["type", "error"], registry=REGISTRY)
EVENT_APPEND_DURATION = Histogram(
    "mlynar_event_append_duration_seconds", "One append, its transient retries included",
    buckets=SECONDS, registry=REGISTRY)

# ---- the projector (projections/projector.py) --------------------------------------------------

PROJECTOR_POSITION = Gauge(
    "mlynar_projector_position", "Stream sequence the projection's checkpoint is at", registry=REGISTRY)
STREAM_HEAD = Gauge(
    "mlynar_stream_head", "The stream's last sequence, read when scraped (by a process with a "
    "projector)", registry=REGISTRY)
PROJECTOR_LAG = Gauge(
    "mlynar_projector_lag_events", "Stream head minus the projection's checkpoint, when scraped",
    registry=REGISTRY)
PROJECTOR_EVENTS = Counter(
    "mlynar_projector_events_applied", "Events applied to the read views", registry=REGISTRY)

# ---- the API (api/metrics.py) ------------------------------------------------------------------

HTTP_DURATION = Histogram(
    "mlynar_http_request_duration_seconds", "API requests by method, route template (the route "
    "table's path, 'unmatched' for none) and status; its _count is the number of requests",
    ["method", "route", "status"], buckets=SECONDS, registry=REGISTRY)

# ---- the webhook dispatcher (integrations/webhooks.py) -----------------------------------------

WEBHOOK_DELIVERIES = Counter(
    "mlynar_webhook_deliveries", "Webhook delivery attempts by outcome: delivered (2xx), "
    "http_error (another status), refused (target not allowed, secret missing), unreachable "
    "(connection error or timeout)", ["outcome"], registry=REGISTRY)
WEBHOOK_DELIVERY_DURATION = Histogram(
    "mlynar_webhook_delivery_duration_seconds", "One delivery attempt", ["outcome"], buckets=SECONDS,
    registry=REGISTRY)
WEBHOOKS_DISABLED = Counter(
    "mlynar_webhooks_disabled", "Webhooks this dispatcher marked failing (WebhookDisabled)",
    registry=REGISTRY)


# ---- gauges read when scraped -----------------------------------------------------------------

Samples = Iterable[tuple[tuple[str, ...], float]]


class Sampled(Collector):
    """A gauge whose samples come from live sources, asked at collection time. A source is an
    object with a method returning ``((label values...), value)`` pairs; it is held weakly, so a
    role that is gone stops reporting without having to say so. Values of several sources with
    the same labels are added (two executors in one process run more steps)."""

    def __init__(self, name: str, documentation: str, labels: list[str], method: str) -> None:
        self.name, self.documentation, self.labels, self.method = name, documentation, labels, method
        self._sources: "weakref.WeakSet[Any]" = weakref.WeakSet()
        REGISTRY.register(self)

    def add(self, source: Any) -> None:
        self._sources.add(source)

    def discard(self, source: Any) -> None:
        self._sources.discard(source)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        totals: dict[tuple[str, ...], float] = {}
        for source in list(self._sources):
            for labels, value in getattr(source, self.method)():
                totals[labels] = totals.get(labels, 0.0) + value
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in sorted(totals.items()):
            family.add_metric(list(labels), value)
        return [family]


RUNNING_STEPS = Sampled(
    "mlynar_executor_running_steps", "Attempts this process's executor is running now, by machine",
    ["machine"], "running_by_machine")
"""Source: ``executors/metrics.py::StepMetrics`` (one per worker)."""
INPUT_SETS_WAITING = Sampled(
    "mlynar_solver_input_sets_waiting", "Input sets of running runs that wait for a free slot of "
    "the run's maxParallel", [], "waiting_sets")
"""Source: the running :class:`mlynar_events.solver.Solver`."""


# ---- exposition --------------------------------------------------------------------------------

ScrapeHook = Callable[[], Awaitable[None]]
_hooks: list[ScrapeHook] = []
SCRAPE_HOOK_TIMEOUT = 2.0
"""Seconds a scrape waits for one hook (a NATS round trip); a late one leaves its old values."""


def on_scrape(hook: ScrapeHook) -> Callable[[], None]:
    """Run ``hook`` before each exposition; returns the function that removes it."""
    _hooks.append(hook)
    return lambda: _hooks.remove(hook) if hook in _hooks else None


async def exposition() -> bytes:
    """This process's metrics in the text format, after the scrape hooks ran."""
    for hook in list(_hooks):
        try:
            await asyncio.wait_for(hook(), SCRAPE_HOOK_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.debug("a metrics hook failed", extra={"error": repr(exc)})
    return generate_latest(REGISTRY)


async def start_server(host: str, port: int) -> Any:
    """``GET /metrics`` on ``host:port`` for a process without the API (``--metrics-port``);
    returns the runner to clean up. Unauthenticated, like every exporter: bind it where only the
    scraper reaches it (the default host is loopback)."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=await exposition(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
