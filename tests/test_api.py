"""The REST API end to end over real HTTP: Mlynar's README sequence shape by shape, the registry,
bad input on every route (each followed by a check that nothing changed), auth, restart and
projection rebuild."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiohttp
import pytest

from mlynar_events.events import RunCreated, RunStarted
from mlynar_events.store import ConcurrencyConflict, EventStore
from projections import queries
from projections.projector import open_db, rebuild
from projections.schema import VIEW_TABLES
from support import Api

KIND = "number-array-json"


async def snapshot(api: Api) -> tuple[int, list[str]]:
    """The stream head and every blob file: what 'nothing changed' compares."""
    store = api.service.store
    blob_root = api.service.settings.resolved_blob_dir
    files = sorted(str(p.relative_to(blob_root)) for p in blob_root.rglob("*") if p.is_file())
    return await store.last_seq(), files


async def test_mlynar_readme_sequence(api: Api) -> None:
    status, run = await api.call("POST", "/api/run")
    assert status == 201
    assert {k: run[k] for k in ("steps", "status", "dataPool", "paramPool")} == {
        "steps": [], "status": "created", "dataPool": [], "paramPool": {}}
    uuid.UUID(run["id"])
    run_id = run["id"]

    status, unit = await api.upload(run_id, KIND, b"[1,2,3,4,5]", field="anything-at-all")
    assert status == 201, unit
    assert unit["dataKind"] == KIND and unit["ancestors"] == []
    assert unit["url"].endswith(f"/static/{run_id}/data/{unit['id']}")
    assert unit["size"] == 11

    run = await api.run(run_id)
    assert [u["id"] for u in run["dataPool"]] == [unit["id"]]
    assert await api.content(unit["url"]) == b"[1,2,3,4,5]"

    status, params = await api.call("GET", f"/api/run/{run_id}/params")
    assert status == 200
    # sum and length take the uploaded kind; average becomes reachable through their outputs
    assert params == {op: [{"name": "MULTIPLY_BY", "defaultValue": "1"}] for op in ("average", "length", "sum")}

    body = {op: [{"name": "MULTIPLY_BY", "defaultValue": "1", "value": v}] for op, v in
            (("length", "3"), ("sum", "5"), ("average", "2"))}
    status, run = await api.call("POST", f"/api/run/{run_id}/run", json=body)
    assert status == 200, run
    assert run["status"] in {"running", "complete"}
    assert run["paramPool"] == body

    run = await api.wait_status(run_id, "complete")
    assert sorted(s["operator"] for s in run["steps"]) == ["average", "length", "sum"]
    for step in run["steps"]:
        assert step["status"] == "success"
        assert step["jobName"] == f"mlynar-job-{step['id']}"
        assert step["pvcName"] == f"mlynar-job-{step['id']}-pvc"
        assert set(step) >= {"id", "jobName", "inputDataUnits", "outputDataUnits", "pvcName", "operator", "status"}
    average_step = next(s for s in run["steps"] if s["operator"] == "average")
    assert set(average_step["inputDataUnits"]) == {"INPUT_SUM", "INPUT_LENGTH"}
    average = next(u for u in run["dataPool"] if u["dataKind"] == "number-array-average-json")
    # lineage order (the original Mlynar's): the inputs' ancestors in the operator's slot order, then itself
    assert average["ancestors"] == ["sum", "length", "average"]
    assert await api.content(average["url"]) == b'{"average":10}'
    assert run["stepCounts"] == {"total": 3, "succeeded": 3, "failed": 0, "cancelled": 0, "active": 0}

    status, kinds = await api.call("GET", "/api/data-kinds")
    assert status == 200 and {k["metadata"]["name"] for k in kinds} >= {KIND, "number-array-sum-json"}
    status, ops = await api.call("GET", "/api/operators")
    assert status == 200 and {o["metadata"]["name"] for o in ops} == {"sum", "length", "average", "fail"}

    status, _ = await api.call("POST", f"/api/run/{run_id}/terminate")
    assert status == 200
    status, body = await api.call("DELETE", f"/api/run/{run_id}")
    assert status == 200, body
    status, body = await api.call("GET", f"/api/run/{run_id}")
    assert status == 404 and body["error"]
    async with api.http.get(unit["url"]) as r:
        assert r.status == 404
    assert not (api.service.settings.resolved_blob_dir / "runs" / run_id).exists()


async def test_delete_running_run_is_409_until_terminated(api: Api) -> None:
    run_id = await api.create_run()
    status, _ = await api.call("POST", f"/api/run/{run_id}/run")
    assert status == 200
    assert (await api.run(run_id))["status"] in {"running", "complete"}
    # an empty running run completes at once; start one that keeps running: upload a failing input
    run_id = await api.create_run()
    await api.upload(run_id, KIND, b"[1]")
    status, _ = await api.call("POST", f"/api/run/{run_id}/run")
    assert status == 200
    # while the run is running (its steps need a moment) deleting is refused, unless it's already done
    status, body = await api.call("DELETE", f"/api/run/{run_id}")
    if status == 409:
        assert "terminate" in body["error"]
        before = await snapshot(api)
        assert (await api.run(run_id))["id"] == run_id
        status, _ = await api.call("POST", f"/api/run/{run_id}/terminate")
        assert status == 200
        assert before[0] < (await snapshot(api))[0]
        status, _ = await api.call("DELETE", f"/api/run/{run_id}")
    assert status == 200


async def test_conditional_appends_one_wins(store: EventStore) -> None:
    run_id = str(uuid.uuid4())
    created = await store.append(RunCreated(run_id=run_id), actor="t", expected_seq=0)
    results = await asyncio.gather(
        store.append(RunStarted(run_id=run_id, max_parallel=1), actor="a", expected_seq=created.seq),
        store.append(RunStarted(run_id=run_id, max_parallel=2), actor="b", expected_seq=created.seq),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ConcurrencyConflict) for r in results) == 1
    events, version = await store.load_run(run_id)
    assert [e.envelope.type for e in events] == ["RunCreated", "RunStarted"]
    # the same message id twice is one event
    again = [await store.append(RunStarted(run_id=run_id), actor="c", msg_id="same") for _ in range(2)]
    assert again[0].seq == again[1].seq and again[1].duplicate
    assert len((await store.load_run(run_id))[0]) == 3


async def test_upload_streams_large_file(api: Api) -> None:
    run_id = await api.create_run()
    chunk = bytes(range(256)) * 4096  # 1 MiB

    async def body():  # 64 MiB, streamed
        for _ in range(64):
            yield chunk

    form = aiohttp.FormData()
    form.add_field("f", body(), filename="big.bin", content_type="application/octet-stream")
    status, unit = await api.call("POST", f"/api/run/{run_id}/upload/{KIND}", data=form)
    assert status == 201, unit
    assert unit["size"] == 64 * len(chunk)
    import hashlib

    assert unit["sha256"] == hashlib.sha256(chunk * 64).hexdigest()


@pytest.fixture
async def small_api(make_service) -> Api:
    return await make_service(max_upload_bytes=1000, max_json_bytes=2000)


async def test_bad_input_changes_nothing(small_api: Api) -> None:
    api = small_api
    run_id = await api.create_run()
    status, unit = await api.upload(run_id, KIND, b"[1,2]")
    assert status == 201
    missing = str(uuid.uuid4())
    ops_before = (await api.call("GET", "/api/operators"))[1]

    async def post_raw(path: str, data: bytes, content_type: str) -> tuple[int, object]:
        return await api.call("POST", path, data=data, headers={"Content-Type": content_type})

    form_no_file = aiohttp.FormData()
    form_no_file.add_field("just", "text")
    cases = [
        ("unknown run", api.call("GET", f"/api/run/{missing}"), 404),
        ("not a uuid", api.call("GET", "/api/run/..%2F..%2Fetc"), 404),
        ("upload to unknown run", api.upload(missing, KIND, b"x"), 404),
        ("upload of unknown kind", api.upload(run_id, "no-such-kind", b"x"), 404),
        ("upload, non-DNS kind", api.upload(run_id, "Bad_Kind", b"x"), 400),
        ("upload, path-like kind", api.call("POST", f"/api/run/{run_id}/upload/..%2Fx", data=b"x"), 400),
        ("upload without a file part", api.call("POST", f"/api/run/{run_id}/upload/{KIND}", data=form_no_file), 400),
        ("upload, not multipart", post_raw(f"/api/run/{run_id}/upload/{KIND}", b"[1]", "application/json"), 400),
        ("upload, malformed multipart", post_raw(f"/api/run/{run_id}/upload/{KIND}", b"--x\r\ngarbage",
                                                 "multipart/form-data; boundary=x"), 400),
        ("upload too large", api.upload(run_id, KIND, b"x" * 5000), 413),
        ("params of unknown run", api.call("GET", f"/api/run/{missing}/params"), 404),
        ("run: malformed JSON", post_raw(f"/api/run/{run_id}/run", b"{nope", "application/json"), 400),
        ("run: unknown operator", api.call("POST", f"/api/run/{run_id}/run", json={"nope": []}), 400),
        ("run: unknown parameter", api.call("POST", f"/api/run/{run_id}/run",
                                             json={"sum": [{"name": "NOPE", "value": "1"}]}), 400),
        ("run: not an object", api.call("POST", f"/api/run/{run_id}/run", json=[1, 2]), 400),
        ("run: bad maxParallel", api.call("POST", f"/api/run/{run_id}/run?maxParallel=zero"), 400),
        ("run: body too large", post_raw(f"/api/run/{run_id}/run", b"{" + b" " * 5000 + b"}", "application/json"), 413),
        ("run unknown run", api.call("POST", f"/api/run/{missing}/run", json={}), 404),
        ("terminate unknown run", api.call("POST", f"/api/run/{missing}/terminate"), 404),
        ("terminate: bad cancel", api.call("POST", f"/api/run/{run_id}/terminate?cancel=maybe"), 400),
        ("delete unknown run", api.call("DELETE", f"/api/run/{missing}"), 404),
        ("static unknown unit", api.call("GET", f"/static/{run_id}/data/{missing}"), 404),
        ("static traversal", api.call("GET", f"/static/{run_id}/data/..%2F..%2Fsecrets"), 404),
        ("logs of unknown step", api.call("GET", f"/api/run/{run_id}/steps/nope/logs"), 404),
        ("kind: missing name", api.call("POST", "/api/data-kinds", json={"kind": "DataKind", "spec": {}}), 400),
        ("kind: non-DNS name", api.call("POST", "/api/data-kinds", json={"metadata": {"name": "A_B"}}), 400),
        ("kind: wrong kind", api.call("POST", "/api/data-kinds", json={"kind": "Operator", "metadata": {"name": "x"}}), 400),
        ("kind: malformed JSON", post_raw("/api/data-kinds", b"{", "application/json"), 400),
        ("op: undeclared kind", api.call("POST", "/api/operators", json={"metadata": {"name": "op1"}, "spec": {
            "image": "i", "inputs": [{"fileLocationEnv": "A", "dataKind": "nope"}]}}), 400),
        ("op: duplicate fileLocationEnv", api.call("POST", "/api/operators", json={"metadata": {"name": "op2"}, "spec": {
            "image": "i", "inputs": [{"fileLocationEnv": "A", "dataKind": KIND}, {"fileLocationEnv": "A", "dataKind": KIND}]}}), 400),
        ("op: missing image and machine", api.call("POST", "/api/operators", json={"metadata": {"name": "op3"}, "spec": {}}), 400),
        ("op: bad env name", api.call("POST", "/api/operators", json={"metadata": {"name": "op4"}, "spec": {
            "image": "i", "constantEnv": [{"name": "1X", "value": "v"}]}}), 400),
        ("op: unknown field", api.call("POST", "/api/operators", json={"metadata": {"name": "op5"}, "spec": {
            "image": "i", "imagePullPolicy": "x"}}), 400),
        ("delete unknown kind", api.call("DELETE", "/api/data-kinds/nope"), 404),
        ("delete kind in use", api.call("DELETE", f"/api/data-kinds/{KIND}"), 409),
        ("delete unknown operator", api.call("DELETE", "/api/operators/nope"), 404),
        ("machine: bad name", api.call("POST", "/api/machines", json={"name": "../x", "url": "http://h:1"}), 400),
        ("machine: bad url", api.call("POST", "/api/machines", json={"name": "m1", "url": "file:///etc"}), 400),
        ("machine: duplicate", api.call("POST", "/api/machines", json={"name": "local", "url": "http://h:1"}), 409),
        ("machine: unknown", api.call("GET", "/api/machines/nope"), 404),
        ("machine: update unknown", api.call("PUT", "/api/machines/nope", json={}), 404),
        ("machine: delete unknown", api.call("DELETE", "/api/machines/nope"), 404),
    ]
    before = await snapshot(api)
    for name, call, expected in cases:
        status, body = await call
        assert status == expected, f"{name}: got {status} {body}"
        assert isinstance(body, dict) and body.get("error"), f"{name}: no JSON error body: {body!r}"
        assert await snapshot(api) == before, f"{name} changed something"
    assert (await api.call("GET", "/api/operators"))[1] == ops_before
    # state conflicts: start twice, upload to a terminated run
    assert (await api.call("POST", f"/api/run/{run_id}/run"))[0] == 200
    before = await snapshot(api)
    status, body = await api.call("POST", f"/api/run/{run_id}/run")
    assert status == 409 and "created" in body["error"]
    assert (await api.call("POST", f"/api/run/{run_id}/terminate"))[0] == 200
    status, body = await api.call("POST", f"/api/run/{run_id}/terminate")
    assert status == 409
    before = await snapshot(api)
    status, body = await api.upload(run_id, KIND, b"[3]")
    assert status == 409 and "terminated" in body["error"]
    assert await snapshot(api) == before


async def test_registry_declare_is_idempotent_and_revisions(api: Api) -> None:
    kind = {"apiVersion": "mlynar.dev/v1alpha1", "kind": "DataKind", "metadata": {"name": "csv"},
            "spec": {"displayName": "CSV"}}
    status, body = await api.call("POST", "/api/data-kinds", json=kind)
    assert (status, body["changed"]) == (201, True)
    head = await api.service.store.last_seq()
    status, body = await api.call("POST", "/api/data-kinds", json=kind)
    assert (status, body["changed"]) == (200, False)
    assert await api.service.store.last_seq() == head  # identical re-declare appends nothing
    op = {"kind": "Operator", "metadata": {"name": "to-csv"}, "spec": {
        "image": "x/y:1", "inputs": [{"fileLocationEnv": "IN", "dataKind": "csv"}], "possibleOutputKinds": ["csv"]}}
    status, body = await api.call("POST", "/api/operators", json=op)
    assert (status, body["revision"]) == (201, 1)
    op["spec"]["image"] = "x/y:2"
    status, body = await api.call("POST", "/api/operators", json=op)
    assert (status, body["revision"]) == (201, 2)
    ops = {o["metadata"]["name"]: o for o in (await api.call("GET", "/api/operators"))[1]}
    assert ops["to-csv"]["revision"] == 2 and ops["to-csv"]["spec"]["image"] == "x/y:2"
    assert (await api.call("DELETE", "/api/operators/to-csv"))[0] == 200
    assert (await api.call("DELETE", "/api/data-kinds/csv"))[0] == 200
    kinds = {k["metadata"]["name"] for k in (await api.call("GET", "/api/data-kinds"))[1]}
    assert "csv" not in kinds


async def test_api_token(make_service, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-the-test\n")
    api = await make_service(api_token_file=token_file)
    assert (await api.call("GET", "/healthz"))[0] == 200
    status, body = await api.call("POST", "/api/run")
    assert status == 401 and body["error"]
    status, _ = await api.call("POST", "/api/run", headers={"Authorization": "Bearer wrong"})
    assert status == 403
    status, _ = await api.call("GET", "/api/runs", headers={"Authorization": "Bearer s3cret-token-of-the-test"})
    assert status == 200


async def test_openapi_document(api: Api) -> None:
    status, doc = await api.call("GET", "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert "post" in doc["paths"]["/api/run/{run_id}/upload/{data_kind}"]
    assert "RunOut" in doc["components"]["schemas"]
    assert "dataPool" in doc["components"]["schemas"]["RunOut"]["properties"]


async def test_machines_keep_tokens_out_of_events(api: Api) -> None:
    body = {"name": "laptop", "url": "http://127.0.0.1:9", "token": "very-secret-value", "labels": {"gpu": "no"}}
    status, machine = await api.call("POST", "/api/machines", json=body)
    assert status == 201, machine
    assert machine["hasToken"] is True and "token" not in machine
    history = await api.service.store.read("mlynar.>")
    assert all(b"very-secret-value" not in h.envelope.to_bytes() for h in history)
    status, check = await api.call("POST", "/api/machines/laptop/check")
    assert status == 200 and check["ok"] is False and "127.0.0.1:9" in str(check["detail"])
    status, local = await api.call("POST", "/api/machines/local/check")
    assert status == 200 and local["ok"] is True, local
    status, updated = await api.call("PUT", "/api/machines/laptop", json={"labels": {"gpu": "yes"}})
    assert status == 200 and updated["labels"] == {"gpu": "yes"} and updated["hasToken"]
    assert (await api.call("DELETE", "/api/machines/laptop"))[0] == 200
    assert (await api.call("GET", "/api/machines/laptop"))[0] == 404


async def test_restart_keeps_runs_and_rebuild_equals_live(make_service, tmp_path: Path) -> None:
    api = await make_service()
    run_id = await api.create_run()
    _, unit = await api.upload(run_id, KIND, b"[1,2,3,4,5]")
    await api.call("POST", f"/api/run/{run_id}/run", json={"sum": [{"name": "MULTIPLY_BY", "value": "5"}]})
    done = await api.wait_status(run_id, "complete")
    await api.http.close()
    await api.service.stop()
    # same data dir, same NATS: everything is still there
    api2 = await make_service()
    again = await api2.run(run_id)
    assert again["status"] == "complete"
    assert [u["id"] for u in again["dataPool"]] == [u["id"] for u in done["dataPool"]]
    assert await api2.content(unit["url"].replace(str(api.service.api_url), "")) == b"[1,2,3,4,5]"
    # a projection rebuilt from sequence 1 equals the live one, view by view
    live_db = api2.service.settings.resolved_db_path
    head = await api2.service.store.last_seq()
    rebuilt = tmp_path / "rebuilt.sqlite3"
    await rebuild(api2.service.store, rebuilt)
    live, fresh = await open_db(live_db), await open_db(rebuilt)
    try:
        from support import wait_until
        from projections.projector import checkpoint

        await wait_until(lambda: _at(live, head), what="live projection at head")
        assert await checkpoint(fresh) == head
        assert await queries.dump(live, VIEW_TABLES) == await queries.dump(fresh, VIEW_TABLES)
    finally:
        await live.close()
        await fresh.close()


async def _at(db, head: int) -> bool:
    from projections.projector import checkpoint

    return await checkpoint(db) >= head
