"""``python -m bench [--smoke] [--out FILE] [--only NAME ...]``: run the benchmarks, print the
table, write the results (``bench/results.json`` for a full run; a temporary file for
``--smoke`` unless ``--out`` is given)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import api, append, e2e, events, replay, scheduling, solver_scaling, webhooks
from .common import FULL, SMOKE, Result, Sizes, cores, say

BENCHMARKS = {
    "append": append.bench,
    "replay": replay.bench,
    "scheduling": scheduling.bench,
    "solver": solver_scaling.bench,
    "e2e": e2e.bench,
    "api": api.bench,
    "events": events.bench,
    "webhooks": webhooks.bench,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def table(results: list[Result]) -> str:
    rows = [("benchmark", "value", "unit", "floor", "ratio", "target", "met")]
    for r in results:
        met = "-" if r.met is None else ("yes" if r.met else "MISS")
        rows.append((r.name, _fmt(r.value), r.unit, _fmt(r.floor), _fmt(r.ratio), r.target or "-", met))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i in (0, 2, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def run_all(sizes: Sizes, only: list[str], work: Path) -> tuple[list[Result], list[str]]:
    results: list[Result] = []
    errors: list[str] = []
    for name, fn in BENCHMARKS.items():
        if only and name not in only:
            continue
        say(f"[bench] {name} ...")
        t0 = time.perf_counter()
        tmp = work / name
        tmp.mkdir(parents=True)
        try:
            results.extend(await fn(sizes, tmp))
        except Exception as exc:  # one broken benchmark must not hide the others
            traceback.print_exc()
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            results.append(Result(name, float("nan"), "error", note=f"{type(exc).__name__}: {exc}"))
        say(f"[bench] {name} done in {time.perf_counter() - t0:.1f}s")
    return results, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (< 60 s); results to a temp file unless --out")
    p.add_argument("--out", type=Path, help=f"where to write the results (default {DEFAULT_OUT} for a full run)")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only this benchmark (repeatable)")
    p.add_argument("--merge", action="store_true",
                   help="with --only: replace those benchmarks' figures in the existing output file, keep the rest")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory (logs of the services)")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = SMOKE if ns.smoke else FULL
    out = ns.out or (Path(tempfile.gettempdir()) / f"mlynar-bench-smoke-{os.getpid()}.json" if ns.smoke else DEFAULT_OUT)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mlynar-bench-"))
    try:
        results, errors = asyncio.run(run_all(sizes, ns.only or [], work))
    finally:
        if ns.keep:
            say(f"[bench] data kept in {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cores": cores(),
        "smoke": sizes.smoke,
        "python": sys.version.split()[0],
        "seconds": round(time.perf_counter() - started, 1),
        "results": [r.as_json() for r in results],
        "errors": errors,
    }
    if ns.merge and ns.only and out.exists():
        old = json.loads(out.read_text())
        prefixes = {r.name.split(" ")[0] for r in results} | {"upload", "service"} if "e2e" in ns.only else \
            {r.name.split(" ")[0] for r in results}
        kept = [r for r in old.get("results", []) if r["name"].split(" ")[0] not in prefixes]
        doc["results"] = kept + doc["results"]
        doc["errors"] = [e for e in old.get("errors", []) if e.split(":")[0] not in ns.only] + errors
        doc["merged"] = f"{', '.join(ns.only)} re-run at {doc['date']}; the rest from {old.get('date')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, allow_nan=False if not errors else True) + "\n")
    print(table(results))
    print(f"\n{len(results)} figures, {sum(r.met is False for r in results)} targets missed, "
          f"{len(errors)} errors; {cores()} cores; written to {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
