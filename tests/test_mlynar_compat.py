"""What clients of the original Mlynar's current version (0.1.41) read, served beside our fields."""

from __future__ import annotations

from datetime import datetime

from api.models import RunOut
from support import Api

KIND = "number-array-json"


async def test_a_run_carries_the_couchdb_fields_and_timing(api: Api) -> None:
    run_id = await api.create_run()
    created = await api.run(run_id)
    assert created["_id"] == run_id and created["startTime"] is None and created["endTime"] is None
    assert created["durationMs"] is None
    assert (await api.upload(run_id, KIND, b"[1,2,3]"))[0] == 201
    uploaded = await api.run(run_id)
    assert uploaded["_rev"] != created["_rev"]  # changes whenever the run does
    assert (await api.call("POST", f"/api/run/{run_id}/run", json={}))[0] == 200
    done = await api.wait_status(run_id, "complete")
    start, end = datetime.fromisoformat(done["startTime"]), datetime.fromisoformat(done["endTime"])
    assert start <= end and done["endTime"] == done["updatedAt"]
    assert abs(done["durationMs"] - (end - start).total_seconds() * 1000) <= 1
    # the document describes exactly what is served
    assert set(done) == set(RunOut.model_json_schema(by_alias=True)["properties"])
    RunOut.model_validate(done)


async def test_lists_are_a_superset_of_the_originals(api: Api) -> None:
    status, kinds = await api.call("GET", "/api/data-kinds")
    assert status == 200
    entry = next(k for k in kinds if k["name"] == KIND)
    assert entry["displayName"] == "Number Array JSON"  # the original's [{name, displayName}]
    assert entry["metadata"]["name"] == KIND and entry["spec"]["displayName"] == "Number Array JSON"
    status, ops = await api.call("GET", "/api/operators")
    assert status == 200
    op = next(o for o in ops if o["name"] == "sum")
    assert op["inputs"] == op["spec"]["inputs"] and op["possibleOutputKinds"] == ["number-array-sum-json"]
    assert op["configurableEnv"] == [{"name": "MULTIPLY_BY", "defaultValue": "1"}]
    assert op["kind"] == "Operator" and op["revision"] >= 1


async def test_data_units_by_id_alone_with_head_and_range(api: Api) -> None:
    run_id = await api.create_run()
    status, unit = await api.upload(run_id, KIND, b"[1,2,3,4,5]")
    assert status == 201
    for path in (f"/api/run/data-unit/{unit['id']}", f"/static/{run_id}/data/{unit['id']}"):
        async with api.http.get(path) as r:
            assert r.status == 200 and await r.read() == b"[1,2,3,4,5]"
        async with api.http.head(path) as r:
            assert r.status == 200 and r.headers["Content-Length"] == "11" and await r.read() == b""
        async with api.http.get(path, headers={"Range": "bytes=1-3"}) as r:
            assert r.status == 206 and await r.read() == b"1,2"
        async with api.http.get(path, headers={"Range": "bytes=50-60"}) as r:
            assert r.status == 416
    assert (await api.call("GET", "/api/run/data-unit/6f7c0f36-5f3e-4a8b-9d2c-1a2b3c4d5e6f"))[0] == 404


async def test_params_leave_out_operators_without_parameters(api: Api, tmp_path) -> None:
    op = {"apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator", "metadata": {"name": "plain"},
          "spec": {"machine": "local", "command": ["true"], "inputs": [{"fileLocationEnv": "IN", "dataKind": KIND}],
                   "possibleOutputKinds": []}}
    assert (await api.call("POST", "/api/operators", json=op))[0] == 201
    run_id = await api.create_run()
    assert (await api.upload(run_id, KIND, b"[1]"))[0] == 201
    status, params = await api.call("GET", f"/api/run/{run_id}/params")
    assert status == 200 and "plain" not in params and "sum" in params


async def test_errors_carry_the_originals_fields_too(api: Api) -> None:
    status, body = await api.call("GET", "/api/run/6f7c0f36-5f3e-4a8b-9d2c-1a2b3c4d5e6f")
    assert status == 404
    assert body["statusCode"] == 404 and body["message"] == body["error"] and "does not exist" in body["error"]
    status, body = await api.call("POST", "/api/operators", json={"kind": "Operator"})
    assert status == 400 and body["statusCode"] == 400 and body["detail"] is not None
