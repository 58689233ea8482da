"""The stream's public contract (docs/events.schema.json) is the code's, and real events obey it."""

from __future__ import annotations

import json

import jsonschema

from mlynar_events.contract import render
from mlynar_events.events import CATALOGUE, SUBJECT_PREFIX
from support import REPO, Api

SCHEMA_FILE = REPO / "docs" / "events.schema.json"


def test_the_checked_in_schema_is_generated_from_the_event_classes() -> None:
    assert SCHEMA_FILE.read_text() == render(), (
        "docs/events.schema.json is stale: python -m mlynar_events.contract > docs/events.schema.json")


async def test_every_event_of_a_real_run_validates_against_the_contract(api: Api) -> None:
    run_id = await api.create_run()
    assert (await api.upload(run_id, "number-array-json", b"[1,2,3]"))[0] == 201
    assert (await api.call("POST", f"/api/run/{run_id}/run", json={}))[0] == 200
    await api.wait_status(run_id, "complete")
    schema = json.loads(SCHEMA_FILE.read_text())
    envelope_validator = jsonschema.Draft202012Validator(schema)
    seen = set()
    for stored in await api.service.store.read(f"{SUBJECT_PREFIX}.>"):
        raw = json.loads(stored.envelope.to_bytes())  # the bytes a foreign consumer reads
        envelope_validator.validate(raw)
        data_schema = {"$ref": f"#/$defs/{raw['type']}", "$defs": schema["$defs"]}
        jsonschema.Draft202012Validator(data_schema).validate(raw["data"])
        cls = CATALOGUE[raw["type"]]
        assert stored.subject.startswith(f"{SUBJECT_PREFIX}.{cls.aggregate}.") and stored.subject.endswith(raw["type"])
        seen.add(raw["type"])
    assert {"DataKindDeclared", "OperatorDeclared", "RunCreated", "StepScheduled", "StepSucceeded", "RunCompleted"} <= seen


def test_the_contract_rejects_what_is_not_an_event() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft202012Validator({"$ref": "#/$defs/StepSucceeded", "$defs": schema["$defs"]})
    assert not validator.is_valid({"run_id": "r", "step_id": "s"})  # attempt and outputs are required
    assert not jsonschema.Draft202012Validator(schema).is_valid(
        {"id": "x", "type": "NoSuchEvent", "schema": 1, "time": "2026-01-01T00:00:00Z", "actor": "a", "data": {}})
