"""5. End to end: a fan-out run of N trivial steps on the built-in ``local`` machine, in steps/s,
against the floor of spawning the same command N times at the same concurrency with asyncio
subprocesses; once with a ``python3`` operator and once with ``sh -c 'cp ...'`` (whose own cost
is near zero, so the gap is orchestration). 7. Peak RSS (VmHWM) of the ``mlynar serve`` process
over the whole of it (the nats-server it uses is a separate process and not counted).

The fan-out source is N uploaded units; the clock runs from ``POST /api/run/{id}/run`` to the
run's ``complete``. Concurrency: the run's ``maxParallel`` and the executor's concurrency are
both set to ``e2e_max_parallel``, but the built-in agent runs at most one step per core, so the
effective concurrency (and the floor's) is ``min(e2e_max_parallel, cores)``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import aiohttp

from .common import Result, ServeProcess, Sizes, cores, embedded_nats, ratio, say

E2E_TARGET = 0.50
RSS_TARGET_MB = 200.0

PY_COPY = (
    "import json, os, shutil; out = os.environ['MLYNAR_OUTPUT_DIR']; "
    "shutil.copyfile(os.environ['IN'], os.path.join(out, 'out')); "
    "json.dump({'outputs': [{'dataKind': os.environ['OUT_KIND'], 'file': 'out'}]}, "
    "open(os.path.join(out, 'mlynar-out.json'), 'w'))"
)
SH_COPY = (
    'cp "$IN" "$MLYNAR_OUTPUT_DIR/out" && '
    'printf \'{"outputs":[{"dataKind":"%s","file":"out"}]}\' "$OUT_KIND" > "$MLYNAR_OUTPUT_DIR/mlynar-out.json"'
)
VARIANTS = {
    "python": ["python3", "-c", PY_COPY],
    "shell": ["sh", "-c", SH_COPY],
}
PAYLOAD = json.dumps(list(range(100))).encode()


def documents(variant: str) -> list[tuple[str, dict]]:
    kin, kout = f"bench-{variant}-in", f"bench-{variant}-out"
    return [
        ("/api/data-kinds", {"apiVersion": "mlynar.dev/v1alpha1", "kind": "DataKind", "metadata": {"name": kin},
                             "spec": {"displayName": f"bench {variant} input"}}),
        ("/api/data-kinds", {"apiVersion": "mlynar.dev/v1alpha1", "kind": "DataKind", "metadata": {"name": kout},
                             "spec": {"displayName": f"bench {variant} output"}}),
        ("/api/operators", {"apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator",
                            "metadata": {"name": f"bench-copy-{variant}"},
                            "spec": {"machine": "local", "command": VARIANTS[variant],
                                     "inputs": [{"fileLocationEnv": "IN", "dataKind": kin}],
                                     "possibleOutputKinds": [kout],
                                     "constantEnv": [{"name": "OUT_KIND", "value": kout}],
                                     "timeoutSeconds": 120}}),
    ]


async def _call(http: aiohttp.ClientSession, method: str, path: str, expect: tuple[int, ...], **kw) -> object:  # type: ignore[no-untyped-def]
    async with http.request(method, path, **kw) as r:
        body = await r.json(content_type=None)
        if r.status not in expect:
            raise RuntimeError(f"{method} {path}: {r.status} {body}")
        return body


async def _upload_all(http: aiohttp.ClientSession, run_id: str, kind: str, n: int, concurrency: int = 4) -> int:
    """Upload ``n`` units, ``concurrency`` at a time; a 409 ("changing too fast": the API's
    conditional append lost too many races) is retried. Returns how many 409s were seen."""
    counter = iter(range(n))
    conflicts = 0

    async def worker() -> None:
        nonlocal conflicts
        for i in counter:
            for attempt in range(50):
                form = aiohttp.FormData()
                form.add_field("file", PAYLOAD, filename=f"in{i}.json", content_type="application/json")
                async with http.post(f"/api/run/{run_id}/upload/{kind}", data=form) as r:
                    if r.status == 201:
                        break
                    if r.status != 409:
                        raise RuntimeError(f"upload: {r.status} {await r.text()}")
                conflicts += 1
                await asyncio.sleep(0.01 * (attempt + 1))
            else:
                raise RuntimeError("upload: 409 fifty times in a row")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return conflicts


async def _fan_out(http: aiohttp.ClientSession, variant: str, n: int, max_parallel: int,
                   timeout: float) -> tuple[float, dict]:
    for path, doc in documents(variant):
        await _call(http, "POST", path, (200, 201), json=doc)
    run = await _call(http, "POST", "/api/run", (201,))
    run_id = run["id"]  # type: ignore[index]
    t0 = time.perf_counter()
    conflicts = await _upload_all(http, run_id, f"bench-{variant}-in", n)
    upload_s = time.perf_counter() - t0
    say(f"  e2e[{variant}]: {n} uploads in {upload_s:.1f}s ({conflicts} x 409 retried)")
    started = time.perf_counter()
    await _call(http, "POST", f"/api/run/{run_id}/run?maxParallel={max_parallel}", (200,), json={})
    while True:
        summaries = await _call(http, "GET", "/api/runs?limit=1000", (200,))
        mine = next(s for s in summaries if s["id"] == run_id)  # type: ignore[union-attr]
        if mine["status"] in {"complete", "terminated"}:
            break
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"e2e[{variant}] run not complete after {timeout}s: {mine}")
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    counts = mine["stepCounts"]
    if counts["succeeded"] != n:
        raise RuntimeError(f"e2e[{variant}]: expected {n} successful steps, got {counts}")
    return n / elapsed, {**counts, "uploads_per_s": n / upload_s, "upload_409s": conflicts}


async def spawn_floor(argv: list[str], n: int, concurrency: int, work: Path) -> float:
    """The same command, ``n`` times, ``concurrency`` at a time, each with its own input copy and
    output directory and the same environment shape the agent gives it: steps/s."""
    work.mkdir(parents=True, exist_ok=True)
    sem = asyncio.Semaphore(concurrency)
    base_env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "OUT_KIND": "x"}

    async def one(i: int) -> None:
        d = work / str(i)
        (d / "out").mkdir(parents=True)
        (d / "in").write_bytes(PAYLOAD)
        async with sem:
            with open(d / "log", "wb") as logf:
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=d, env={**base_env, "HOME": str(d), "IN": str(d / "in"),
                                       "MLYNAR_OUTPUT_DIR": str(d / "out")},
                    stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True)
                rc = await proc.wait()
        if rc != 0:
            raise RuntimeError(f"{argv[0]} exited {rc}: {(d / 'log').read_text()[-500:]}")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    rate = n / (time.perf_counter() - started)
    shutil.rmtree(work, ignore_errors=True)
    return rate


async def bench(sizes: Sizes, tmp: Path) -> list[Result]:
    n, mp = sizes.e2e_steps, sizes.e2e_max_parallel
    effective = min(mp, cores())
    out: list[Result] = []
    floors = {v: await spawn_floor(argv, n, effective, tmp / f"floor-{v}") for v, argv in VARIANTS.items()}
    async with embedded_nats(tmp) as url:
        async with ServeProcess(tmp / "serve", url, "api,projector,solver,executor",
                                "--executor-concurrency", str(mp), "--max-parallel", str(mp)) as service:
            async with aiohttp.ClientSession(service.url) as http:
                for variant in VARIANTS:
                    rate, counts = await _fan_out(http, variant, n, mp, timeout=max(120.0, n * 2.0))
                    r = ratio(rate, floors[variant])
                    target = f"ratio >= {E2E_TARGET}" if variant == "python" else None
                    met = (r is not None and r >= E2E_TARGET) if variant == "python" else None
                    out.append(Result(f"e2e fan-out ({variant} operator)", rate, "steps/s", floors[variant], r,
                                      target, met, note=f"{n} steps, concurrency {effective}; floor = asyncio "
                                                        f"subprocess spawn of the same command"))
                    out.append(Result(f"upload rate ({variant} run, 4 concurrent)", counts["uploads_per_s"],
                                      "uploads/s", note=f"{n} uploads into one run, "
                                                        f"{counts['upload_409s']} x 409 retried; informational"))
                    say(f"  e2e[{variant}]: {rate:.1f} steps/s vs floor {floors[variant]:.1f}")
            hwm = service.vm_hwm_kib()
    mb = (hwm or 0) / 1024
    out.append(Result("service peak RSS", mb, "MB", None, None, f"<= {RSS_TARGET_MB:g} MB", mb <= RSS_TARGET_MB,
                      note="VmHWM of the mlynar serve process over both fan-out runs (uploads included)"))
    return out
