"""What the CLI prints: tables for people (rich), the API's own JSON (``-o json``) or YAML
(``-o yaml``) for scripts. Machine-readable output is the API's answer unchanged, so a script can
rely on the documented REST shapes rather than on a second, CLI-only format."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any, Iterable

import yaml
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .models import HistoryEvent, Run, RunSummary, Step

FORMATS = ("table", "json", "yaml")
STATUS_STYLE = {
    "success": "green", "complete": "green", "failure": "red", "terminated": "red", "cancelled": "yellow",
    "running": "cyan", "created": "dim",
}


def console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr). Piped output is not cut to 80 columns: a run id is 36
    characters and tables would otherwise fold it."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 200, highlight=False, soft_wrap=not stream.isatty())


def emit(data: Any, fmt: str, table: Any | None = None) -> None:
    """``data`` as JSON or YAML on stdout, or ``table`` (a rich renderable, or a line of text) for
    ``-o table``."""
    if fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    elif fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    elif table is not None:
        console().print(table)


def status(text: str) -> Text:
    return Text(text, style=STATUS_STYLE.get(text, ""))


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """``3m``, ``2h``, ``5d``: kubectl's AGE column."""
    if when is None:
        return ""
    seconds = int(((now or datetime.now(timezone.utc)) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


def short(ident: str | None) -> str:
    return (ident or "")[:8]


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c, no_wrap=c in {"ID", "NAME", "RUN"})
    return table


def kinds_table(kinds: list[dict[str, Any]]) -> Table:
    table = _table("NAME", "DISPLAY NAME")
    for k in kinds:
        table.add_row(k["metadata"]["name"], k.get("spec", {}).get("displayName") or "")
    return table


def operators_table(operators: list[dict[str, Any]]) -> Table:
    table = _table("NAME", "REVISION", "RUNS ON", "INPUTS", "OUTPUTS")
    for o in operators:
        spec = o.get("spec", {})
        where = f"machine {spec['machine']}" if spec.get("machine") else f"job {spec.get('image') or ''}".strip()
        inputs = ", ".join(f"{i['fileLocationEnv']}={i['dataKind']}" for i in spec.get("inputs", []))
        table.add_row(o["metadata"]["name"], str(o.get("revision", "")), where, inputs,
                      ", ".join(spec.get("possibleOutputKinds", [])))
    return table


def machines_table(machines: list[dict[str, Any]]) -> Table:
    table = _table("NAME", "URL", "LABELS", "TOKEN", "AGE")
    for m in machines:
        labels = ",".join(f"{k}={v}" for k, v in sorted(m.get("labels", {}).items()))
        registered = datetime.fromisoformat(m["registeredAt"]) if m.get("registeredAt") else None
        table.add_row(m["name"], m["url"], labels, "yes" if m.get("hasToken") else "no", ago(registered))
    return table


def tokens_table(tokens: list[dict[str, Any]]) -> Table:
    table = _table("ID", "PRINCIPAL", "ROLE", "DESCRIPTION", "CREATED BY", "AGE", "REVOKED")
    for t in tokens:
        created = datetime.fromisoformat(t["createdAt"]) if t.get("createdAt") else None
        revoked = datetime.fromisoformat(t["revokedAt"]) if t.get("revokedAt") else None
        table.add_row(t["id"], t["principal"], t["role"], t.get("description", ""), t.get("createdBy", ""),
                      ago(created), f"{ago(revoked)} ago" if revoked else "")
    return table


def step_counts(counts: Any) -> str:
    parts = [f"{counts.succeeded} ok"]
    if counts.failed:
        parts.append(f"{counts.failed} failed")
    if counts.cancelled:
        parts.append(f"{counts.cancelled} cancelled")
    if counts.active:
        parts.append(f"{counts.active} active")
    return f"{counts.total} ({', '.join(parts)})" if counts.total else "0"


def runs_table(runs: Iterable[RunSummary]) -> Table:
    table = _table("ID", "STATUS", "STEPS", "AGE")
    for r in runs:
        table.add_row(r.id, status(r.status), step_counts(r.stepCounts), ago(r.createdAt))
    return table


def steps_table(steps: list[Step]) -> Table:
    table = _table("STEP", "OPERATOR", "STATUS", "ATTEMPT", "DURATION", "ERROR")
    for s in steps:
        table.add_row(short(s.id), s.operator, status(s.status), str(s.attempt or ""), seconds(s.duration),
                      (s.error or "").splitlines()[0] if s.error else "")
    return table


def run_view(run: Run, at: int | None = None) -> Group:
    """A run as ``run get`` shows it: a header, its steps, its data pool."""
    head = Text.assemble(("run ", "bold"), (run.id, "bold"), "  ", status(run.status),
                         f"  steps {step_counts(run.stepCounts)}", f"  created {ago(run.createdAt)} ago")
    if at is not None:
        head.append(f"  (as of sequence {at})", style="italic")
    if run.terminationReason:
        head.append(f"\nterminated: {run.terminationReason}")
    params = "  ".join(f"{op}.{p['name']}={p.get('value') if p.get('value') is not None else p.get('defaultValue')}"
                       for op, plist in sorted(run.paramPool.items()) for p in plist)
    parts: list[Any] = [head]
    if params:
        parts.append(Text(f"params: {params}"))
    if run.steps:
        parts += [Text(""), steps_table(run.steps)]
    pool = _table("UNIT", "KIND", "FILE", "SIZE", "FROM")
    producer = {s.id: s.operator for s in run.steps}
    for u in run.dataPool:
        pool.add_row(short(u.id), u.dataKind, u.filename, str(u.size),
                     f"step {short(u.stepId)} ({producer.get(u.stepId or '', '?')})" if u.stepId else "upload")
    if run.dataPool:
        parts += [Text(""), pool]
    return Group(*parts)


def history_table(events: list[HistoryEvent]) -> Table:
    """A run's history as a timeline: time, sequence, actor, type and what happened."""
    operators: dict[str, str] = {}
    table = _table("TIME", "SEQ", "ACTOR", "TYPE", "SUMMARY")
    for e in events:
        if e.type == "StepScheduled":
            operators[e.data.get("step_id", "")] = e.data.get("operator", "?")
        table.add_row(e.time.astimezone(timezone.utc).strftime("%H:%M:%S.%f")[:-3], str(e.sequence), e.actor,
                      e.type, event_summary(e.type, e.data, operators))
    return table


def event_summary(kind: str, data: dict[str, Any], operators: dict[str, str]) -> str:
    """One line of what an event says, for people; the full data is in ``-o json``."""
    step = data.get("step_id")
    op = f"{operators.get(step or '', '?')} (step {short(step)})" if step else ""
    match kind:
        case "DataUnitAdded":
            origin = f"output of {op}" if step else "upload"
            return f"{data.get('data_kind')} {data.get('filename')} ({data.get('size')} B, unit {short(data.get('unit_id'))}), {origin}"
        case "RunStarted":
            params = " ".join(f"{o}.{k}={v}" for o, kv in sorted(data.get("param_pool", {}).items())
                              for k, v in sorted(kv.items()))
            return f"maxParallel {data.get('max_parallel')}" + (f", {params}" if params else "")
        case "StepScheduled":
            inputs = ", ".join(f"{i.get('env')}={i.get('data_kind')}" for i in data.get("inputs", []))
            return f"{op} revision {data.get('revision')}" + (f", inputs {inputs}" if inputs else "")
        case "StepStarted":
            return f"{op} attempt {data.get('attempt')} on {data.get('target')}"
        case "StepSucceeded":
            return f"{op} attempt {data.get('attempt')}, {len(data.get('outputs', []))} output(s)"
        case "StepFailed" | "StepAttemptFailed":
            retry = f", retry in {data['retry_in']:.1f}s" if "retry_in" in data else ""
            return f"{op} attempt {data.get('attempt')}: {(data.get('error') or '').splitlines()[0] if data.get('error') else ''}{retry}"
        case "StepCancelled":
            return f"{op}: {data.get('reason')}"
        case "StepOutputReturned":
            return f"{op} returned {data.get('data_kind')} {data.get('filename')}"
        case "RunTerminationRequested":
            return f"{data.get('reason')}" + (", cancel running steps" if data.get("cancel") else "")
        case "RunTerminated":
            return str(data.get("reason", ""))
        case _:
            return ""
