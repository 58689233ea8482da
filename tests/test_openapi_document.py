"""What the OpenAPI document says about each route, read from the live document, and the service
behaviours it promises that a fuzzer finds only by chance (405 with ``Allow``, non-object JSON
refused). ``tests/test_openapi_schemathesis.py`` checks the whole document against the service."""

from __future__ import annotations

from typing import Any

import pytest

from api.routes import ROUTES, Access
from support import Api


@pytest.fixture
async def doc(api: Api) -> dict[str, Any]:
    status, document = await api.call("GET", "/api/openapi.json")
    assert status == 200
    return document


def op(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]


def schema_of(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


async def test_security_follows_each_routes_access(doc: dict[str, Any]) -> None:
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "the API token (--api-token-file)"}
    for r in ROUTES:
        o = op(doc, r.method, r.path)
        if r.access is Access.PUBLIC:
            assert o["security"] == [], r.path
        elif r.access is Access.STEP:
            assert o["security"] == [{"stepCredential": []}], r.path
            assert {"401", "403"} <= set(o["responses"]), r.path
        else:
            assert "security" not in o and {"401", "403"} <= set(o["responses"]), r.path
    ids = [o["operationId"] for methods in doc["paths"].values() for o in methods.values()]
    assert len(ids) == len(set(ids)) == len(ROUTES)


async def test_success_codes_are_the_services(doc: dict[str, Any]) -> None:
    created = {("POST", "/api/run"), ("POST", "/api/run/{run_id}/upload/{data_kind}"),
               ("POST", "/api/data-kinds"), ("POST", "/api/operators"), ("POST", "/api/machines"),
               ("POST", "/api/webhooks"), ("POST", "/api/webhooks/{webhook_id}/rotate-secret"),
               ("POST", "/api/run/{run_id}/returns/{step_id}/{data_kind}"), ("POST", "/api/tokens")}
    for r in ROUTES:
        codes = {c for c in op(doc, r.method, r.path)["responses"] if c.startswith("2")}
        assert ("201" in codes) == ((r.method, r.path) in created), (r.method, r.path, codes)
    # the same document again: a repeated declaration or return is a 200
    for path in ("/api/data-kinds", "/api/operators", "/api/run/{run_id}/returns/{step_id}/{data_kind}"):
        assert {"200", "201"} <= set(op(doc, "POST", path)["responses"])
    # POST /run and /terminate change a run, they create nothing (README, Coming from Mlynar)
    assert "201" not in op(doc, "POST", "/api/run/{run_id}/run")["responses"]


async def test_error_codes_where_they_occur(doc: dict[str, Any]) -> None:
    for r in ROUTES:
        o = op(doc, r.method, r.path)
        if "requestBody" in o:
            assert {"400", "408", "413"} <= set(o["responses"]), r.path
        if r.query:
            assert "400" in o["responses"], r.path
    for method, path in (("POST", "/api/run/{run_id}/upload/{data_kind}"), ("DELETE", "/api/run/{run_id}"),
                         ("POST", "/api/run/{run_id}/returns/{step_id}/{data_kind}")):
        assert "503" in op(doc, method, path)["responses"], path
    assert "507" in op(doc, "POST", "/api/run/{run_id}/upload/{data_kind}")["responses"]
    error = op(doc, "GET", "/api/run/{run_id}")["responses"]["404"]["content"]["application/json"]["schema"]
    assert set(schema_of(doc, error)["properties"]) == {"error", "detail", "statusCode", "message"}


async def test_request_schemas(doc: dict[str, Any]) -> None:
    upload = op(doc, "POST", "/api/run/{run_id}/upload/{data_kind}")["requestBody"]
    assert upload["content"]["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert upload["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
    returned = op(doc, "POST", "/api/run/{run_id}/returns/{step_id}/{data_kind}")["requestBody"]
    assert returned["content"]["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
    pool = op(doc, "POST", "/api/run/{run_id}/run")["requestBody"]
    assert pool["required"] is False
    assert pool["content"]["application/json"]["schema"]["type"] == "object"
    kind = schema_of(doc, op(doc, "POST", "/api/data-kinds")["requestBody"]["content"]["application/json"]["schema"])
    assert kind["properties"]["kind"]["const"] == "DataKind" and "metadata" in kind["required"]
    operator = schema_of(doc, op(doc, "POST", "/api/operators")["requestBody"]["content"]["application/json"]["schema"])
    assert operator["properties"]["kind"]["const"] == "Operator"
    spec = doc["components"]["schemas"]["OperatorSpec"]
    assert spec["additionalProperties"] is False  # with machine: command; without: image
    assert spec["then"]["required"] == ["command"] and spec["else"]["required"] == ["image"]
    name = doc["components"]["schemas"]["Metadata"]["properties"]["name"]
    assert name["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" and name["maxLength"] == 63


async def test_response_schemas(doc: dict[str, Any]) -> None:
    for r in ROUTES:
        responses = op(doc, r.method, r.path)["responses"]
        assert any(c.startswith(("2", "3")) for c in responses), r.path
    assert "content" in op(doc, "DELETE", "/api/run/{run_id}")["responses"]["200"]
    assert "content" in op(doc, "GET", "/api/run/{run_id}/params")["responses"]["200"]
    step = op(doc, "GET", "/api/run/{run_id}/steps/{step_id}")["responses"]["200"]["content"]["application/json"]
    assert "attempts" in schema_of(doc, step["schema"])["properties"]
    logs = op(doc, "GET", "/api/run/{run_id}/steps/{step_id}/logs")["responses"]["200"]["content"]
    assert list(logs) == ["text/plain"]
    for path in ("/static/{run_id}/data/{unit_id}", "/api/run/data-unit/{unit_id}"):
        o = op(doc, "GET", path)
        assert o["responses"]["200"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
        assert {"206", "416", "304", "412"} <= set(o["responses"])
        assert any(p["name"] == "Range" and p["in"] == "header" for p in o["parameters"])
        assert "content" not in op(doc, "HEAD", path)["responses"]["200"]
    assert "text/event-stream" in op(doc, "GET", "/api/events")["responses"]["200"]["content"]
    assert set(op(doc, "GET", "/api/run/{run_id}/events")["responses"]["200"]["content"]) == {
        "application/json", "text/event-stream"}


async def test_parameters(doc: dict[str, Any]) -> None:
    def params(method: str, path: str) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in op(doc, method, path).get("parameters", [])}

    get_input = params("GET", "/api/run/{run_id}/returns/{step_id}/inputs/{index}")
    assert get_input["attempt"]["required"] is True and get_input["index"]["schema"]["type"] == "integer"
    returned = params("POST", "/api/run/{run_id}/returns/{step_id}/{data_kind}")
    assert returned["attempt"]["required"] and returned["index"]["required"] and not returned["filename"]["required"]
    assert params("GET", "/api/run/{run_id}")["run_id"]["schema"] == {"type": "string", "format": "uuid"}
    assert params("DELETE", "/api/data-kinds/{name}")["name"]["schema"]["pattern"].startswith("^[a-z0-9]")
    assert params("GET", "/api/webhooks/{webhook_id}")["webhook_id"]["schema"]["pattern"] == "^[0-9a-f]{32}$"
    assert params("GET", "/api/runs")["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    event_types = params("GET", "/api/events")["type"]
    assert event_types["schema"]["type"] == "array" and "RunCreated" in event_types["schema"]["items"]["enum"]


async def test_an_undeclared_method_is_405_with_allow(api: Api) -> None:
    for path, allowed in (("/healthz", {"GET"}), ("/api/runs", {"GET"}), ("/api/data-kinds", {"GET", "POST"}),
                          ("/static/00000000-0000-0000-0000-000000000000/data/x", {"GET", "HEAD"})):
        async with api.http.request("TRACE", path) as r:
            assert r.status == 405
            assert set(r.headers["Allow"].replace(" ", "").split(",")) == allowed, r.headers["Allow"]
            assert (await r.json())["statusCode"] == 405


@pytest.mark.parametrize("body", [b"null", b"[]", b"3", b'"text"', b"true"])
async def test_json_bodies_must_be_objects(api: Api, body: bytes) -> None:
    run_id = await api.create_run()
    headers = {"Content-Type": "application/json"}
    for path in ("/api/data-kinds", "/api/operators", "/api/machines", f"/api/run/{run_id}/run"):
        status, answer = await api.call("POST", path, data=body, headers=headers)
        assert status == 400 and "must be an object" in answer["error"], (path, answer)
    assert (await api.run(run_id))["status"] == "created"  # nothing changed


async def test_a_runs_events_as_json_take_the_type_filter_too(api: Api) -> None:
    run_id = await api.create_run()
    assert (await api.call("POST", f"/api/run/{run_id}/run"))[0] == 200
    await api.wait_status(run_id, "complete")
    status, body = await api.call("GET", f"/api/run/{run_id}/events?type=RunStarted")
    assert status == 200 and [e["type"] for e in body["events"]] == ["RunStarted"]
    status, body = await api.call("GET", f"/api/run/{run_id}/events?type=NoSuchEvent")
    assert status == 400 and "NoSuchEvent" in body["error"]
