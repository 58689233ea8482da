"""Mlynar's README example, driven over the REST API like a user would with curl: create a run,
upload ``[1,2,3,4,5]``, read ``/params``, run with length=3 sum=5 average=2, follow the steps, print
the average (``{"average":10}``)."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp

DATA = b"[1,2,3,4,5]"
PARAMS = {"length": "3", "sum": "5", "average": "2"}


def say(text: str) -> None:
    print(text, flush=True)


async def run_example(base: str, token: str | None, timeout: float = 120.0) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(base, headers=headers) as http:
        async with http.post("/api/run") as r:
            run = await r.json()
        run_id = run["id"]
        say(f"[example] created run {run_id}")
        form = aiohttp.FormData()
        form.add_field("file", DATA, filename="numbers.json", content_type="application/json")
        async with http.post(f"/api/run/{run_id}/upload/number-array-json", data=form) as r:
            unit = await r.json()
            if r.status != 201:
                say(f"[example] upload failed: {unit}")
                return 1
        say(f"[example] uploaded [1,2,3,4,5] as number-array-json -> unit {unit['id']}")
        async with http.get(f"/api/run/{run_id}/params") as r:
            params = await r.json()
        say(f"[example] params: {', '.join(sorted(params))}")
        body = {op: [{**p, "value": PARAMS.get(op, p["defaultValue"])} for p in plist] for op, plist in params.items()}
        async with http.post(f"/api/run/{run_id}/run", json=body) as r:
            if r.status != 200:
                say(f"[example] run failed: {await r.text()}")
                return 1
        say("[example] started with MULTIPLY_BY length=3 sum=5 average=2")
        started, seen = time.monotonic(), {}
        while time.monotonic() - started < timeout:
            async with http.get(f"/api/run/{run_id}") as r:
                run = await r.json()
            for step in run["steps"]:
                if seen.get(step["id"]) != step["status"]:
                    seen[step["id"]] = step["status"]
                    say(f"[example] step {step['operator']:<8} {step['status']}")
            if run["status"] in {"complete", "terminated"}:
                break
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        say(f"[example] run {run['status']} in {elapsed:.2f}s: {run['stepCounts']}")
        averages = [u for u in run["dataPool"] if u["dataKind"] == "number-array-average-json"]
        if run["status"] != "complete" or not averages:
            say("[example] no average was computed")
            return 1
        async with http.get(averages[0]["url"].replace(averages[0]["url"].split("/static/")[0], "")) as r:
            content = await r.text()
        say(f"[example] average ({averages[0]['url']}):")
        say(content)
        say(f"[example] web view: {base}/ui/ (this run: {base}/ui/#/run/{run_id})")
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(run_example(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:3000", None)))
