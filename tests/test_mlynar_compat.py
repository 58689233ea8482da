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
