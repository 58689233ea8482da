"""6. API: ``GET /api/run/{id}`` p50/p99 and requests/s with C concurrent clients and N runs
stored (each a finished run with 3 uploads and 3 succeeded steps). The service is ``mlynar serve
--roles api,projector`` in a child process; the history is appended straight to the stream. Floor:
a bare aiohttp server (``python -m bench.static_server``, also a child process) answering every
request with the same bytes, hit by the same client the same way."""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from pathlib import Path

import aiohttp

from mlynar_events.events import Envelope
from mlynar_events.nats_server import free_port
from mlynar_events.store import EventStore

from .common import REPO, Result, ServeProcess, Sizes, clean_env, embedded_nats, percentile, ratio, say
from .fixtures import run_history

P99_MS = 20.0
UNITS_PER_RUN = 3


async def _populate(store: EventStore, runs: int) -> tuple[list[str], int]:
    ids, pending = [], []
    for _ in range(runs):
        run_id = str(uuid.uuid4())
        ids.append(run_id)
        for event in run_history(run_id, UNITS_PER_RUN):
            pending.append(await store.js.publish_async(event.subject(), Envelope.wrap(event, "bench").to_bytes()))
        if len(pending) > 512:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return ids, await store.last_seq()


async def _load(base: str, paths: list[str], clients: int, requests: int) -> tuple[list[float], float]:
    """``clients`` concurrent clients, ``requests`` GETs in all: latencies (ms) and requests/s."""
    latencies: list[float] = []
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector) as http:
        async def client() -> None:
            rnd = random.Random()
            for _ in counter:
                path = rnd.choice(paths)
                t0 = time.perf_counter()
                async with http.get(path) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"GET {path}: {r.status}")
                latencies.append((time.perf_counter() - t0) * 1000)

        warm = iter(range(min(50, requests)))
        for _ in warm:
            async with http.get(paths[0]) as r:
                await r.read()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return latencies, requests / elapsed


async def _static_server(body: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.static_server", str(port), str(body), cwd=str(REPO), env=clean_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(base) as http:
        for _ in range(300):
            try:
                async with http.get("/ready") as r:
                    if r.status == 200:
                        return proc, base
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise TimeoutError("static server did not start")


async def bench(sizes: Sizes, tmp: Path) -> list[Result]:
    clients, requests = sizes.api_clients, sizes.api_requests
    async with embedded_nats(tmp) as url:
        store = await EventStore.connect(url)
        try:
            ids, head = await _populate(store, sizes.api_runs)
        finally:
            await store.close()
        async with ServeProcess(tmp / "serve", url, "api,projector", "--no-local-machine") as service:
            async with aiohttp.ClientSession(service.url) as http:
                t0 = time.perf_counter()
                while True:
                    async with http.get("/healthz") as r:
                        if (await r.json())["position"] >= head:
                            break
                    if time.perf_counter() - t0 > 300:
                        raise TimeoutError("projection did not catch up")
                    await asyncio.sleep(0.1)
                say(f"  api: {len(ids)} runs ({head} events) projected in {time.perf_counter() - t0:.1f}s")
                async with http.get(f"/api/run/{ids[0]}") as r:
                    body = await r.read()
            paths = [f"/api/run/{i}" for i in ids]
            body_file = tmp / "body.json"
            body_file.write_bytes(body)
            proc, base = await _static_server(body_file)
            try:  # alternate rounds (the machine is shared); each side keeps its best round
                rounds = []
                for _ in range(2):
                    rounds.append(("ours", *await _load(service.url, paths, clients, requests)))
                    rounds.append(("floor", *await _load(base, paths, clients, requests)))
            finally:
                proc.terminate()
                await proc.wait()
    ours_lat, ours_rps = max(((lat, rps) for who, lat, rps in rounds if who == "ours"), key=lambda x: x[1])
    floor_lat, floor_rps = max(((lat, rps) for who, lat, rps in rounds if who == "floor"), key=lambda x: x[1])
    note = f"{clients} clients, {len(ids)} runs stored, {len(body)} B body; floor = bare aiohttp, same bytes"
    out = [Result("GET /api/run/{id} throughput", ours_rps, "req/s", floor_rps, ratio(ours_rps, floor_rps), note=note)]
    for p in (50, 99):
        v, f = percentile(ours_lat, p), percentile(floor_lat, p)
        target = P99_MS if p == 99 else None
        out.append(Result(f"GET /api/run/{{id}} p{p}", v, "ms", f, ratio(v, f),
                          f"<= {target:g} ms" if target else None, (v <= target) if target else None, note=note))
    return out
