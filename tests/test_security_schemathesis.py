"""Schemathesis against the running service's own ``/api/openapi.json``: every operation, with
generated valid and invalid inputs, answers without a 5xx (docs/ARCHITECTURE.md, "Error rules").

Bounded and deterministic (``derandomize``, a fixed number of examples per operation and mode)
so it stays well under a minute. It holds the line "no input makes the service answer 5xx",
also aimed at a run that exists; ``tests/test_openapi_schemathesis.py`` runs every check."""

from __future__ import annotations

import asyncio
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from support import Api

EXAMPLES = 20
"""Examples per operation and generation mode (positive and negative)."""


def fuzz(base_url: str, document: dict[str, Any], run_id: str) -> list[str]:
    """Run every operation's cases (in this worker thread, with blocking HTTP); the 5xx answers."""
    schema = schemathesis.openapi.from_dict(document)
    server_errors: list[str] = []
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        strategies = [operation.as_strategy(generation_mode=mode) for mode in GenerationMode]
        if "run_id" in operation.path:  # also aim at a run that exists, not only at random ids
            strategies.append(operation.as_strategy(path_parameters={"run_id": run_id}))

        @hypothesis.settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                             suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=hypothesis.strategies.one_of(strategies))
        def call(case: Any) -> None:
            response = case.call(base_url=base_url, session=session, timeout=30)
            if response.status_code >= 500:
                server_errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                     f"{response.text[:200]}")

        call()
    return server_errors


@pytest.mark.timeout(240)
async def test_no_generated_input_gets_a_5xx(api: Api) -> None:
    run_id = await api.create_run()
    status, document = await api.call("GET", "/api/openapi.json")
    assert status == 200
    # the service runs on this event loop; schemathesis' blocking client runs in a worker thread
    server_errors = await asyncio.to_thread(fuzz, str(api.service.api_url), document, run_id)
    assert server_errors == []
