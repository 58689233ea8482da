"""Live progress of a run, from its event stream (``GET /api/run/{id}/events`` with ``Accept:
text/event-stream``; CloudEvents in ``data:``, ``id:`` = the stream sequence).

The watcher starts from a snapshot of the run (``GET /api/run/{id}``, whose ``version`` is the
sequence of the last event in it) and then follows the stream *after* that sequence, so nothing is
missed and nothing counted twice between the two. If the connection drops it reconnects with
``Last-Event-ID`` = the last sequence it applied, which the service resumes exactly. What it shows
is folded from the events themselves (not re-read from the read views, which may lag the stream by
a few milliseconds): steps by status, a bar of finished/known steps, a line per finished step with
its operator and duration, and for a failed step the first lines of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator

import aiohttp
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import render
from .http import OK, STEP_FAILED, TERMINATED, UNREACHABLE, Api, ApiError, CliError
from .models import FINAL_RUN, FINISHED_STEP, CloudEvent, Run

FINAL_EVENTS = {"RunCompleted": "complete", "RunTerminated": "terminated", "RunDeleted": "deleted"}
STEP_OUTCOME = {"StepSucceeded": "success", "StepFailed": "failure", "StepCancelled": "cancelled"}
STATUS_ORDER = ("created", "running", "success", "failure", "cancelled")
LOG_LINES = 10
"""How many of a failed step's log lines the watcher prints (``mlynar run logs`` has them all)."""
RECONNECT_FOR = 60.0
"""Seconds of failed reconnects after which the watcher gives up (the run itself is unaffected)."""
READ_TIMEOUT = 90.0
"""A stream silent this long is dead (the service sends a heartbeat every 15 s by default)."""
LOG_WAIT = 5.0
"""How long a failed step's log may take to become readable (the read views may trail the stream)."""


@dataclass
class StepState:
    id: str
    operator: str
    status: str
    started: datetime | None = None
    finished: datetime | None = None
    error: str | None = None
    has_log: bool = True

    @property
    def duration(self) -> float | None:
        return (self.finished - self.started).total_seconds() if self.started and self.finished else None


class RunFold:
    """What the watcher knows of a run: its steps, where it is in the stream, how it ended."""

    def __init__(self, run: Run) -> None:
        self.run_id = run.id
        self.created = run.createdAt
        self.seq = run.version
        self.steps = {s.id: StepState(s.id, s.operator, s.status, s.startedAt, s.finishedAt, s.error)
                      for s in run.steps}
        # a terminated run has ended once its last running step has (then RunTerminated follows)
        active = any(s.status not in FINISHED_STEP for s in run.steps)
        self.final: str | None = run.status if run.status in FINAL_RUN and not active else None
        self.ended: datetime | None = run.updatedAt if self.final else None
        self.reason = run.terminationReason

    def apply(self, seq: int, event: CloudEvent) -> StepState | None:
        """Fold one event; answers the step it finished, if it finished one."""
        self.seq = max(self.seq, seq)
        kind, data = event.event_type, event.data
        step_id = data.get("step_id", "")
        if kind == "StepScheduled":
            self.steps.setdefault(step_id, StepState(step_id, data.get("operator", "?"), "created"))
        elif kind == "StepStarted" and step_id in self.steps:
            step = self.steps[step_id]
            step.status = "running"
            step.started = step.started or event.time
        elif kind in STEP_OUTCOME and step_id in self.steps:
            step = self.steps[step_id]
            step.status, step.finished = STEP_OUTCOME[kind], event.time
            step.error = data.get("error") or data.get("reason")
            step.has_log = bool(data.get("logs_blob"))
            return step
        elif kind in FINAL_EVENTS:
            self.final, self.ended = FINAL_EVENTS[kind], event.time
            self.reason = data.get("reason", self.reason)
        elif kind == "RunTerminationRequested":
            self.reason = data.get("reason")
        return None

    def by_status(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUS_ORDER}
        for step in self.steps.values():
            counts[step.status] = counts.get(step.status, 0) + 1
        return counts

    @property
    def failed(self) -> bool:
        return any(s.status == "failure" for s in self.steps.values())

    def exit_code(self) -> int:
        if self.final in ("terminated", "deleted"):
            return TERMINATED
        return STEP_FAILED if self.failed else OK


async def events(api: Api, run_id: str, after: int) -> AsyncIterator[tuple[int, CloudEvent]]:
    """The run's events after sequence ``after``, reconnecting with ``Last-Event-ID`` whenever
    the connection drops or ends (for up to :data:`RECONNECT_FOR` seconds of failures in a row);
    the caller stops at the event it waits for (the service ends a run's stream after its final
    event, which the caller has seen by then)."""
    failing_since: float | None = None
    backoff = 0.25
    while True:
        try:
            async with contextlib.aclosing(_stream_once(api, run_id, after)) as stream:
                async for seq, event in stream:
                    failing_since, backoff = None, 0.25
                    after = seq
                    yield seq, event
            problem = "the stream ended"
        except CliError as exc:
            if exc.code != UNREACHABLE or (isinstance(exc, ApiError) and exc.status < 500):
                raise
            problem = exc.message
        now = time.monotonic()
        failing_since = failing_since or now
        if now - failing_since > RECONNECT_FOR:
            raise CliError(f"lost the event stream of run {run_id} ({problem}); "
                           f"the run goes on: mlynar run watch {run_id}", UNREACHABLE)
        await asyncio.sleep(backoff)  # back off between reconnects, not a synchronisation
        backoff = min(backoff * 2, 5.0)


async def _stream_once(api: Api, run_id: str, after: int) -> AsyncIterator[tuple[int, CloudEvent]]:
    """One SSE connection, parsed: ``id:``/``event:``/``data:`` fields, a blank line ends a
    message, ``:`` lines are comments (heartbeats)."""
    headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT)
    async with api.request("GET", f"/api/run/{run_id}/events", headers=headers, timeout=timeout) as resp:
        seq, data = None, []
        try:
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if seq is not None and data:
                        yield seq, CloudEvent.model_validate_json("\n".join(data))
                    seq, data = None, []
                elif line.startswith(":"):
                    continue
                else:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "id":
                        seq = int(value)
                    elif field == "data":
                        data.append(value)
        except TimeoutError:
            raise CliError(f"the event stream of run {run_id} went silent", UNREACHABLE) from None


async def step_log(api: Api, run_id: str, step_id: str, wait: float = LOG_WAIT) -> str | None:
    """A finished step's log; the read views may trail the event that said it finished, so a
    404 is retried until ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    delay = 0.05
    while True:
        try:
            return await api.text(f"/api/run/{run_id}/steps/{step_id}/logs")
        except ApiError as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                return None
        await asyncio.sleep(delay)  # the projection catching up; bounded by the deadline
        delay = min(delay * 2, 0.5)


class Display:
    """The watcher's screen: lines printed as steps finish and, on a terminal, a live footer with
    the bar and the counts by status (piped output gets the lines and a final footer only)."""

    def __init__(self, fold: RunFold, out: Console) -> None:
        self.fold, self.out = fold, out
        self.live: Live | None = Live(self.footer(), console=out, refresh_per_second=8, transient=False) \
            if out.is_terminal else None
        self.width = 8

    def __enter__(self) -> "Display":
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.update(self.footer())
            self.live.stop()
        else:
            self.out.print(self.footer())

    def refresh(self) -> None:
        if self.live:
            self.live.update(self.footer())

    def footer(self) -> Table:
        counts = self.fold.by_status()
        known = sum(counts.values())
        done = sum(counts[s] for s in FINISHED_STEP)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(ProgressBar(total=max(known, 1), completed=done if known else 0, width=30),
                     Text(f"{done}/{known} steps"),
                     Text.assemble(*[x for s in STATUS_ORDER if counts.get(s)
                                     for x in ((f"{s} {counts[s]}", render.STATUS_STYLE.get(s, "")), "  ")]))
        return grid

    def finished(self, step: StepState, log: str | None) -> None:
        self.width = max(self.width, len(step.operator))
        mark = {"success": ("✓", "green"), "failure": ("✗", "red")}.get(step.status, ("○", "yellow"))
        line = Text.assemble((mark[0] + " ", mark[1]), f"{step.operator:<{self.width}}  ",
                             render.status(f"{step.status:<9}"), f" {render.seconds(step.duration):>7}",
                             f"  step {render.short(step.id)}")
        parts: list = [line]
        if step.status == "failure" and step.error:
            parts.append(Text(f"    {step.error.splitlines()[0]}", style="red"))
        if log is not None:
            lines = log.splitlines()
            for text in lines[:LOG_LINES]:
                parts.append(Text(f"    │ {text}", style="dim"))
            if len(lines) > LOG_LINES:
                parts.append(Text(f"    │ … {len(lines) - LOG_LINES} more: mlynar run logs {self.fold.run_id} "
                                  f"{step.id}", style="dim"))
        self.out.print(Group(*parts))
        self.refresh()

    def summary(self) -> Text:
        f = self.fold
        counts = f.by_status()
        took = f" in {render.seconds((f.ended - f.created).total_seconds())}" if f.ended and f.created else ""
        what = ", ".join(f"{counts[s]} {word}" for s, word in
                         (("success", "succeeded"), ("failure", "failed"), ("cancelled", "cancelled")) if counts[s])
        text = Text.assemble("run ", f.run_id, " ", render.status(f.final or "?"), took, f": {what or 'no steps'}")
        if f.final in ("terminated", "deleted") and f.reason:
            text.append(f" ({f.reason})")
        return text


async def watch(api: Api, run: Run, out: Console) -> RunFold:
    """Follow ``run`` (a snapshot just read) until it ends; answers what was seen (its
    :meth:`RunFold.exit_code` is the command's)."""
    fold = RunFold(run)
    if fold.final is None:
        out.print(f"watching run {run.id} (Ctrl-C stops watching, not the run)", style="dim")
    with Display(fold, out) as display:
        for step in fold.steps.values():
            if step.status in FINISHED_STEP:  # its log, if any, is readable by now
                display.finished(step, await step_log(api, run.id, step.id, wait=0) if step.status == "failure" else None)
        if fold.final is None:
            async with contextlib.aclosing(events(api, run.id, fold.seq)) as stream:
                async for seq, event in stream:
                    step = fold.apply(seq, event)
                    if step is not None:
                        failed = step.status == "failure" and step.has_log
                        display.finished(step, await step_log(api, run.id, step.id) if failed else None)
                    else:
                        display.refresh()
                    if fold.final is not None:
                        break
    out.print(display.summary())
    return fold
