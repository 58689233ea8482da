"""Prometheus metrics (docs/METRICS.md), against real parts: a service on a real nats-server,
scraped over HTTP before and after real runs; the text is parsed with prometheus-client's own
parser, and the counters must have moved by exactly what the run did.

Services started by one test share the process's registry (one per process, as in production),
so every assertion is on a difference between two scrapes of the same test."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mlynar_events.example import run_example
from support import REPO, Api, wait_until
from test_execution import data_kind, declare, operator, script, start
from test_webhooks import FAST, Receiver, create, receiver  # noqa: F401  (the receiver fixture)

OPERATORS = ("length", "sum", "average")  # the README example's steps, all on machine `local`
TOKEN = "metrics-test-token-0123456789"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def scrape(http: aiohttp.ClientSession, url: str = "/metrics", **kw: Any) -> Samples:
    async with http.get(url, **kw) as r:
        text = await r.text()
        assert r.status == 200, text
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def by_label(before: Samples, after: Samples, name: str, label: str) -> dict[str, float]:
    """The non-zero differences of ``name`` per value of ``label``."""
    out: dict[str, float] = {}
    for key in set(before) | set(after):
        n, labels = key
        if n == name:
            delta = after.get(key, 0.0) - before.get(key, 0.0)
            if delta:
                v = dict(labels)[label]
                out[v] = out.get(v, 0.0) + delta
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a run of the README example -----------------------------------------------------------------


async def test_a_run_of_the_example_moves_each_counter_by_what_it_did(api: Api) -> None:
    before = await scrape(api.http)
    assert await run_example(api.service.api_url, None, timeout=60) == 0
    after = await scrape(api.http)

    for op in OPERATORS:
        step = dict(operator=op, machine="local")
        assert moved(before, after, "mlynar_steps_scheduled_total", operator=op) == 1
        assert moved(before, after, "mlynar_scheduling_latency_seconds_count", operator=op) == 1
        assert moved(before, after, "mlynar_steps_started_total", **step) == 1
        assert moved(before, after, "mlynar_step_attempts_total", **step) == 1
        assert moved(before, after, "mlynar_steps_finished_total", **step, outcome="success") == 1
        assert moved(before, after, "mlynar_step_duration_seconds_count", **step, outcome="success") == 1
    for name in ("mlynar_steps_finished_total", "mlynar_step_attempt_failures_total", "mlynar_step_retries_total"):
        assert by_label(before, after, name, "outcome" if "finished" in name else "cause") == (
            {"success": 3} if "finished" in name else {}), name
    # every event of the run, each counted once by the role that appended it
    assert by_label(before, after, "mlynar_events_appended_total", "type") == {
        "RunCreated": 1, "DataUnitAdded": 4, "RunStarted": 1, "StepScheduled": 3, "StepStarted": 3,
        "StepSucceeded": 3, "RunCompleted": 1}
    assert moved(before, after, "mlynar_event_append_duration_seconds_count") >= 16
    assert total(after, "mlynar_event_append_errors_total", error="unavailable") == total(
        before, "mlynar_event_append_errors_total", error="unavailable")
    # nothing left running or waiting
    assert total(after, "mlynar_executor_running_steps") == 0
    assert value(after, "mlynar_solver_input_sets_waiting") == 0
    # the requests the example made, by route template
    http = "mlynar_http_request_duration_seconds_count"
    assert moved(before, after, http, method="POST", route="/api/run", status="201") == 1
    assert moved(before, after, http, method="POST", route="/api/run/{run_id}/upload/{data_kind}", status="201") == 1
    assert moved(before, after, http, method="GET", route="/api/run/{run_id}/params", status="200") == 1
    assert moved(before, after, http, method="POST", route="/api/run/{run_id}/run", status="200") == 1
    assert moved(before, after, http, method="GET", route="/api/run/{run_id}", status="200") >= 1

    # the projector has applied all of it: lag 0, position = head
    async def caught_up() -> Samples | None:
        s = await scrape(api.http)
        return s if value(s, "mlynar_projector_lag_events") == 0 else None

    final = await wait_until(caught_up, what="the projector's lag to be 0")
    head = await api.service.store.last_seq()
    assert value(final, "mlynar_stream_head") == head == value(final, "mlynar_projector_position")
    assert moved(before, final, "mlynar_projector_events_applied_total") >= 16


async def test_a_request_is_labelled_with_its_route_template_never_its_path(api: Api) -> None:
    run_id = await api.create_run()
    missing = "0b7e2f4a-5c1d-4e8f-9a3b-6d2c1e0f9a87"
    before = await scrape(api.http)
    for _ in range(2):
        assert (await api.call("GET", f"/api/run/{run_id}"))[0] == 200
    assert (await api.call("GET", f"/api/run/{missing}"))[0] == 404
    assert (await api.call("GET", f"/no/such/{missing}"))[0] == 404
    assert (await api.call("PROPFIND", f"/api/run/{run_id}"))[0] == 405  # a WebDAV method: "other"
    after = await scrape(api.http)

    http = "mlynar_http_request_duration_seconds_count"
    assert moved(before, after, http, method="GET", route="/api/run/{run_id}", status="200") == 2
    assert moved(before, after, http, method="GET", route="/api/run/{run_id}", status="404") == 1
    assert moved(before, after, http, method="GET", route="unmatched", status="404") == 1
    assert total(after, http, method="other") - total(before, http, method="other") == 1
    routes = {dict(labels).get("route") for (name, labels) in after if name.startswith("mlynar_http_")}
    assert not any(run_id in r or missing in r for r in routes if r), routes
    assert all(r == "unmatched" or r.startswith("/") for r in routes if r)


# ---- limits, retries, failures -----------------------------------------------------------------


async def test_waiting_input_sets_and_running_steps_follow_a_limited_run(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    await declare(api, data_kind("metrics-in"),
                  operator("gated", script(tmp_path, "gated", f"wait_for({str(gate)!r})\noutputs()\n"),
                           inputs=[("IN", "metrics-in")]))
    run_id = await api.create_run()
    for n in range(3):
        status, body = await api.upload(run_id, "metrics-in", f"[{n}]".encode())
        assert status == 201, body
    before = await scrape(api.http)
    await start(api, run_id, "?maxParallel=1")

    async def limited() -> Samples | None:
        s = await scrape(api.http)
        one_running = value(s, "mlynar_executor_running_steps", machine="local") == 1
        return s if one_running and value(s, "mlynar_solver_input_sets_waiting") == 2 else None

    await wait_until(limited, what="one step running and two input sets waiting for maxParallel=1")
    gate.write_text("go")
    await api.wait_status(run_id, "complete")
    after = await scrape(api.http)
    assert value(after, "mlynar_solver_input_sets_waiting") == 0
    assert value(after, "mlynar_executor_running_steps", machine="local") == 0
    assert moved(before, after, "mlynar_steps_finished_total", operator="gated", machine="local", outcome="success") == 3
    # the two that waited for a slot are counted with their wait, all three once
    assert moved(before, after, "mlynar_scheduling_latency_seconds_count", operator="gated") == 3


async def test_retries_and_failures_are_counted_by_cause(api: Api, tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    flaky = script(tmp_path, "flaky", f"if not os.path.exists({str(marker)!r}):\n"
                                      f"    touch({str(marker)!r})\n    sys.exit(3)\noutputs()\n")
    broken = script(tmp_path, "broken", "sys.exit(4)\n")
    await declare(api, data_kind("metrics-in"),
                  operator("flaky", flaky, inputs=[("IN", "metrics-in")], retries=1),
                  operator("broken", broken, inputs=[("IN", "metrics-in")], retries=0))
    run_id = await api.create_run()
    assert (await api.upload(run_id, "metrics-in", b"[1]"))[0] == 201
    before = await scrape(api.http)
    await start(api, run_id)
    await api.wait_status(run_id, "complete")
    after = await scrape(api.http)

    flaky_l, broken_l = dict(operator="flaky", machine="local"), dict(operator="broken", machine="local")
    assert moved(before, after, "mlynar_steps_started_total", **flaky_l) == 1
    assert moved(before, after, "mlynar_step_attempts_total", **flaky_l) == 2
    assert moved(before, after, "mlynar_step_attempt_failures_total", **flaky_l, cause="operator") == 1
    assert moved(before, after, "mlynar_step_retries_total", **flaky_l, cause="operator") == 1
    assert moved(before, after, "mlynar_steps_finished_total", **flaky_l, outcome="success") == 1
    assert moved(before, after, "mlynar_step_attempts_total", **broken_l) == 1
    assert moved(before, after, "mlynar_step_attempt_failures_total", **broken_l, cause="operator") == 1
    assert moved(before, after, "mlynar_step_retries_total", **broken_l, cause="operator") == 0
    assert moved(before, after, "mlynar_steps_finished_total", **broken_l, outcome="failure") == 1
    assert moved(before, after, "mlynar_step_duration_seconds_count", **broken_l, outcome="failure") == 1
    assert total(after, "mlynar_step_attempt_failures_total", cause="infrastructure") == total(
        before, "mlynar_step_attempt_failures_total", cause="infrastructure")
    assert by_label(before, after, "mlynar_events_appended_total", "type")["StepAttemptFailed"] == 1


async def test_attempts_lost_to_the_infrastructure_are_counted_apart(make_service, tmp_path: Path) -> None:
    api = await make_service(executor_infra_retries=1)
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there: each attempt is lost
    status, body = await api.call("POST", "/api/machines", json={"name": "nowhere", "url": nowhere, "token": "t0ken"})
    assert status == 201, body
    await declare(api, operator("remote-op", script(tmp_path, "never", "outputs()\n"), machine="nowhere", retries=5))
    run_id = await api.create_run()
    before = await scrape(api.http)
    await start(api, run_id)
    await api.wait_status(run_id, "complete", timeout=60)
    after = await scrape(api.http)

    step = dict(operator="remote-op", machine="nowhere")
    assert moved(before, after, "mlynar_step_attempts_total", **step) == 2  # the first and one retry (the cap)
    assert moved(before, after, "mlynar_step_attempt_failures_total", **step, cause="infrastructure") == 2
    assert moved(before, after, "mlynar_step_retries_total", **step, cause="infrastructure") == 1
    assert moved(before, after, "mlynar_step_attempt_failures_total", **step, cause="operator") == 0  # retries unused
    assert moved(before, after, "mlynar_steps_finished_total", **step, outcome="failure") == 1


# ---- processes and access ----------------------------------------------------------------------


async def test_metrics_port_serves_a_process_without_the_api(make_service, tmp_path: Path) -> None:
    api = await make_service(roles=["api", "projector"])
    port = free_port()
    workers = await make_service(roles=["solver", "executor"], data_dir=tmp_path / "workers",
                                 blob_dir=api.service.settings.resolved_blob_dir, metrics_port=port)
    assert workers.service.api_url is None
    assert workers.service.metrics_url == f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as http:
        before = await scrape(http, workers.service.metrics_url)
        assert await run_example(api.service.api_url, None, timeout=60) == 0
        after = await scrape(http, workers.service.metrics_url)
    for op in OPERATORS:
        assert moved(before, after, "mlynar_steps_finished_total", operator=op, machine="local", outcome="success") == 1
        assert moved(before, after, "mlynar_steps_scheduled_total", operator=op) == 1
    assert value(after, "process_cpu_seconds_total") > 0 or ("process_cpu_seconds_total", frozenset()) in after


async def test_metrics_port_off_by_default(api: Api) -> None:
    assert api.service.settings.metrics_port == 0 and api.service.metrics_url is None


async def test_metrics_need_the_api_token_when_one_is_configured(make_service, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    api = await make_service(api_token_file=token_file)
    async with api.http.get("/metrics") as r:
        assert r.status == 401
    async with api.http.get("/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"}) as r:
        assert r.status == 403
    samples = await scrape(api.http, headers={"Authorization": f"Bearer {TOKEN}"})
    assert value(samples, "mlynar_http_request_duration_seconds_count", method="GET", route="/metrics",
                 status="401") >= 1


# ---- webhooks ----------------------------------------------------------------------------------


async def test_webhook_deliveries_by_outcome(make_service, receiver: Receiver) -> None:  # noqa: F811
    api = await make_service(**{**FAST, "webhook_max_failures": 3})
    receiver.status["bad"] = 500
    before = await scrape(api.http)
    good = await create(api, url=receiver.url("ok"), types=["RunCreated"])
    bad = await create(api, url=receiver.url("bad"), types=["RunCreated"])
    await api.create_run()

    async def failing() -> bool:
        return (await api.call("GET", f"/api/webhooks/{bad['id']}"))[1]["status"] == "failing"

    await wait_until(failing, what="the failing webhook marked failing")
    await wait_until(lambda: _async(len(receiver.of("ok")) == 1), what="the good webhook's delivery")

    async def counted() -> Samples | None:
        s = await scrape(api.http)
        return s if moved(before, s, "mlynar_webhook_deliveries_total", outcome="delivered") == 1 else None

    after = await wait_until(counted, what="the delivery counted")
    assert good["id"] != bad["id"]
    assert moved(before, after, "mlynar_webhook_deliveries_total", outcome="http_error") == 3
    assert moved(before, after, "mlynar_webhook_delivery_duration_seconds_count", outcome="http_error") == 3
    assert moved(before, after, "mlynar_webhooks_disabled_total") == 1
    assert not any(good["id"] in str(labels) or bad["id"] in str(labels) for _, labels in after)


async def _async(x: Any) -> Any:
    return x


# ---- the reference page, the dashboard and the manifests use the real names --------------------


def series_names() -> dict[str, str]:
    """Every series name of our metrics (``_total`` of a counter, ``_bucket``/``_count``/``_sum``
    of a histogram) -> the name docs/METRICS.md lists it by."""
    from mlynar_events.metrics import REGISTRY

    out: dict[str, str] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("mlynar_"):
            continue
        if family.type == "counter":
            out[family.name + "_total"] = family.name + "_total"
        elif family.type == "histogram":
            out.update({family.name + suffix: family.name for suffix in ("_bucket", "_count", "_sum")})
        else:
            out[family.name] = family.name
    return out


def test_the_reference_page_lists_exactly_the_metrics() -> None:
    import re

    page = (REPO / "docs" / "METRICS.md").read_text()
    listed = set(re.findall(r"^\| `(mlynar_\w+)` \|", page, re.M))
    assert listed == set(series_names().values())


def test_the_dashboard_queries_only_real_metrics() -> None:
    import json
    import re

    dashboard = json.loads((REPO / "deploy" / "grafana" / "mlynar.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bmlynar_\w+", e)}
    assert used and used <= set(series_names()), used - set(series_names())
    assert {"mlynar_steps_finished_total", "mlynar_projector_lag_events", "mlynar_executor_running_steps",
            "mlynar_http_request_duration_seconds_bucket"} <= used


def test_every_deployment_exposes_its_metrics_port_and_says_so() -> None:
    import yaml

    for path in sorted((REPO / "deploy").glob("mlynar-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] != "Deployment":
                continue
            pod = doc["spec"]["template"]
            (container,) = pod["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            notes = pod["metadata"]["annotations"]
            assert env["MLYNAR_METRICS_HOST"] == "0.0.0.0", path
            assert int(env["MLYNAR_METRICS_PORT"]) == ports["metrics"] == int(notes["prometheus.io/port"]), path
            assert (notes["prometheus.io/scrape"], notes["prometheus.io/path"]) == ("true", "/metrics"), path
