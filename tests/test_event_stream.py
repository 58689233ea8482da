"""The event interface: SSE that resumes exactly (also across a restart), filters, a run's own
stream that ends with the run, and the history as the audit trail."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from cloudevents.core.formats.json import JSONFormat

from mlynar_events.events import SUBJECT_PREFIX
from support import Api

KIND = "number-array-json"
SUM = {"sum": [{"name": "MULTIPLY_BY", "value": "5"}]}


class SseReader:
    """A minimal EventSource: parses ``id:``/``event:``/``data:`` messages off a live response."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []

    async def next(self) -> dict[str, Any] | None:
        message: dict[str, Any] = {}
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                return None  # the server ended the stream
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in message:
                    return message
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            field, _, value = line.partition(": ")
            message[field] = value

    async def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            m = await self.next()
            assert m is not None, f"stream ended after {len(out)} of {n} events"
            out.append(m)
        return out


async def open_stream(api: Api, path: str, **headers: str) -> tuple[aiohttp.ClientResponse, SseReader]:
    resp = await api.http.get(path, headers={"Accept": "text/event-stream", **headers},
                              timeout=aiohttp.ClientTimeout(total=60))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return resp, SseReader(resp)


async def finished_run(api: Api) -> str:
    run_id = await api.create_run()
    assert (await api.upload(run_id, KIND, b"[1,2,3,4,5]"))[0] == 201
    assert (await api.call("POST", f"/api/run/{run_id}/run", json=SUM))[0] == 200
    await api.wait_status(run_id, "complete")
    return run_id


async def test_resume_after_a_restart_has_no_gap_and_no_duplicate(make_service) -> None:
    api = await make_service()
    first_run = await finished_run(api)
    resp, sse = await open_stream(api, "/api/events")
    head = await api.service.store.last_seq()
    seen = []
    while not seen or int(seen[-1]["id"]) < head:
        seen += await sse.take(1)
    resp.close()
    last = seen[-1]["id"]
    await api.http.close()
    await api.service.stop()

    api2 = await make_service()  # same data dir, same NATS: a restarted service
    second_run = await finished_run(api2)
    resp2, sse2 = await open_stream(api2, "/api/events", **{"Last-Event-ID": last})
    head2 = await api2.service.store.last_seq()
    while int(seen[-1]["id"]) < head2:
        seen += await sse2.take(1)
    resp2.close()

    expected = [e.seq for e in await api2.service.store.read(f"{SUBJECT_PREFIX}.>")]
    assert [int(m["id"]) for m in seen] == expected  # every event, in order, none twice
    ces = [JSONFormat().read(None, m["data"]) for m in seen]
    assert {ce.get_subject() for ce in ces} >= {first_run, second_run}
    for m, ce in zip(seen, ces):
        assert ce.get_type() == f"dev.mlynar.{m['event']}"
        assert int(ce.get_extension("sequence")) == int(m["id"])


async def test_filters_by_run_and_type(api: Api) -> None:
    a, b = await finished_run(api), await finished_run(api)
    resp, sse = await open_stream(api, f"/api/events?run={b}&type=StepSucceeded&type=RunCompleted")
    got = await sse.take(1)
    while got[-1]["event"] != "RunCompleted":
        got += await sse.take(1)
    resp.close()
    steps = (await api.run(b))["steps"]
    assert [m["event"] for m in got] == ["StepSucceeded"] * len(steps) + ["RunCompleted"]
    assert {json.loads(m["data"])["subject"] for m in got} == {b} and a != b


async def test_a_runs_stream_ends_after_its_final_event(api: Api) -> None:
    run_id = await finished_run(api)
    resp, sse = await open_stream(api, f"/api/run/{run_id}/events")
    messages = []
    while (m := await sse.next()) is not None:
        messages.append(m)
    history = [e.seq for e in await api.service.store.read(f"{SUBJECT_PREFIX}.run.{run_id}.>")]
    assert [int(m["id"]) for m in messages] == history
    assert messages[-1]["event"] == "RunCompleted"


async def test_history_is_the_audit_trail_in_pages(api: Api) -> None:
    run_id = await finished_run(api)
    status, page1 = await api.call("GET", f"/api/run/{run_id}/history?limit=2")
    assert status == 200 and len(page1["events"]) == 2 and page1["next"] == page1["events"][-1]["sequence"]
    status, rest = await api.call("GET", f"/api/run/{run_id}/history?after={page1['next']}")
    assert status == 200 and rest["next"] is None
    events = page1["events"] + rest["events"]
    stored = await api.service.store.read(f"{SUBJECT_PREFIX}.run.{run_id}.>")
    assert [(e["sequence"], e["id"], e["type"], e["actor"]) for e in events] == [
        (s.seq, s.envelope.id, s.event.event_type, s.envelope.actor) for s in stored]
    assert events[0]["type"] == "RunCreated" and events[0]["actor"] == "anonymous"
    assert any(e["actor"] == "solver" for e in events if e["type"] == "StepScheduled")


async def test_bad_stream_requests_are_400s(api: Api) -> None:
    for path, headers in [
        ("/api/events?type=NoSuchEvent", {}),
        ("/api/events?run=not-a-run", {}),
        ("/api/events?after=-1", {}),
        ("/api/events", {"Last-Event-ID": "yesterday"}),
        ("/api/events?after=99999999999999999999999", {}),
    ]:
        status, body = await api.call("GET", path, headers={"Accept": "text/event-stream", **headers})
        assert status == 400, (path, body)
        assert body["error"]
    status, _ = await api.call("GET", "/api/run/6f7c0f36-5f3e-4a8b-9d2c-1a2b3c4d5e6f/history")
    assert status == 404


RUN_STATUS = {"RunCreated": "created", "RunStarted": "running", "RunCompleted": "complete"}
STEP_STATUS = {"StepScheduled": "created", "StepStarted": "running", "StepSucceeded": "success"}


def independent_fold(envelopes: list[tuple[int, str, dict[str, Any]]], at: int) -> dict[str, Any]:
    """What the run looked like right after ``at``, folded here from the raw events (not by the
    service's code): status, steps with their status, units, version."""
    status, steps, units, version = None, {}, [], 0
    for seq, kind, data in envelopes:
        if seq > at:
            break
        version = seq
        status = RUN_STATUS.get(kind, status)
        if kind == "DataUnitAdded":
            units.append(data["unit_id"])
            status = "running" if status == "complete" else status
        if kind in STEP_STATUS and (kind == "StepScheduled" or data["step_id"] in steps):
            steps[data["step_id"]] = STEP_STATUS[kind]
    return {"status": status, "steps": steps, "units": units, "version": version}


async def test_a_run_at_every_sequence_equals_an_independent_fold(api: Api) -> None:
    run_id = await finished_run(api)
    envelopes = [(s.seq, s.envelope.type, s.envelope.data)
                 for s in await api.service.store.read(f"{SUBJECT_PREFIX}.run.{run_id}.>")]
    for seq, _, _ in envelopes:
        status, body = await api.call("GET", f"/api/run/{run_id}?at={seq}")
        assert status == 200, body
        got = {"status": body["status"], "steps": {s["id"]: s["status"] for s in body["steps"]},
               "units": [u["id"] for u in body["dataPool"]], "version": body["version"]}
        assert got == independent_fold(envelopes, seq), seq
    live = await api.run(run_id)
    status, last = await api.call("GET", f"/api/run/{run_id}?at={envelopes[-1][0]}")
    assert last == live  # the past, at the run's last event, is the present
    assert (await api.call("GET", f"/api/run/{run_id}?at={envelopes[0][0] - 1}"))[0] == 404
    assert (await api.call("GET", f"/api/run/{run_id}?at=0"))[0] == 400
    assert (await api.call("GET", f"/api/run/{run_id}?at=soon"))[0] == 400


async def test_lineage_and_provenance_of_the_example(api: Api) -> None:
    run_id = await finished_run(api)
    run = await api.run(run_id)
    status, graph = await api.call("GET", f"/api/run/{run_id}/lineage")
    assert status == 200
    units = {n["id"]: n for n in graph["nodes"] if n["type"] == "unit"}
    steps = {n["id"]: n for n in graph["nodes"] if n["type"] == "step"}
    assert set(units) == {u["id"] for u in run["dataPool"]} and set(steps) == {s["id"] for s in run["steps"]}
    edges = {(e["source"], e["target"]) for e in graph["edges"]}
    for s in run["steps"]:
        assert {(u, s["id"]) for u in s["inputDataUnits"].values()} <= edges
        assert {(s["id"], u) for u in s["outputDataUnits"]} <= edges
    assert len(edges) == sum(len(s["inputDataUnits"]) + len(s["outputDataUnits"]) for s in run["steps"])

    average = next(u for u in run["dataPool"] if u["dataKind"] == "number-array-average-json")
    status, chain = await api.call("GET", f"/api/run/{run_id}/units/{average['id']}/provenance")
    assert status == 200
    step = chain["producedBy"]
    assert step["operator"] == "average" and step["parameters"] == {"MULTIPLY_BY": "1"}
    by_op = {i["producedBy"]["operator"]: i for i in step["inputs"]}
    assert set(by_op) == {"sum", "length"}
    assert by_op["sum"]["producedBy"]["parameters"] == {"MULTIPLY_BY": "5"}  # what ran, from the run's params
    upload = by_op["sum"]["producedBy"]["inputs"][0]
    assert upload["dataKind"] == KIND and upload["producedBy"] is None
    assert (await api.call("GET", f"/api/run/{run_id}/units/nope/provenance"))[0] == 404


async def test_a_closed_stream_ends_its_handler_and_stopping_ends_open_ones(make_service, caplog) -> None:
    import logging

    from support import wait_until

    caplog.set_level(logging.DEBUG, logger="mlynar.api.events")
    api = await make_service(sse_heartbeat=3600.0)  # no heartbeat would reveal the closed client
    resp, sse = await open_stream(api, "/api/events")
    assert await sse.next() is not None  # the stream is live
    resp.close()  # the client hangs up while nothing is being sent

    async def ended() -> bool:
        return any(r.getMessage() == "event stream closed" for r in caplog.records)

    await wait_until(ended, what="the closed stream's handler to end (and close its consumer)")

    resp, sse = await open_stream(api, "/api/events")
    assert await sse.next() is not None
    await api.service.stop()  # must not wait for the client, which never hangs up
    while (m := await sse.next()) is not None:  # the server ends the stream: the rest arrives, then EOF
        pass
    resp.close()


async def test_many_live_subscribers_each_get_every_event_once(api: Api) -> None:
    """They share one subscription of the stream (the hub): each still sees exactly the stream."""
    head = await api.service.store.last_seq()
    streams = [await open_stream(api, f"/api/events?after={head}") for _ in range(5)]
    ahead = await open_stream(api, f"/api/events?after={head + 3}")  # resuming past some
    run_id = await finished_run(api)
    expected = [e.seq for e in await api.service.store.read(f"{SUBJECT_PREFIX}.>", head + 1)]
    for n, (resp, sse) in enumerate(streams + [ahead]):
        want = expected if n < len(streams) else [s for s in expected if s > head + 3]
        got = [int(m["id"]) for m in await sse.take(len(want))]
        assert got == want
        resp.close()
    assert run_id
