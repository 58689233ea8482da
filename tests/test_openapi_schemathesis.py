"""The OpenAPI document is true: schemathesis with **all** its checks (as ``st run --checks all``)
against a live service that requires a token, through the document it serves, finds nothing.

Every phase runs (examples, coverage, fuzzing, stateful), in-process through schemathesis'
engine, bounded (a fixed seed, ``MAX_EXAMPLES`` per operation) so it stays under a minute. The
checks cover status codes, content types, response schemas and headers, that schema-valid
requests are accepted and invalid ones refused, that auth is enforced (401/403), that an
undeclared method answers 405 with ``Allow``, that what was created can be read and what was
deleted is gone.

What a schema cannot say, stated here operation by operation (:data:`REGISTRY_REFERENCES`):
some bodies name things that must exist in the registry (an operator's data kinds, the param
pool's operators and parameters, a webhook's host must resolve). A well-formed body naming
something unknown is a 400 the document lists, so for those operations a 400 is an accepted
answer to schema-valid data too."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema

from support import Api

TOKEN = "schemathesis-token-0123456789abcdef"
MAX_EXAMPLES = 15
"""Generated cases per operation and phase: enough that every check sees every operation."""

REGISTRY_REFERENCES = {
    "POST /api/run/{run_id}/run": "the param pool names operators and parameters the registry must hold",
    "POST /api/operators": "an operator's data kinds must be declared (and its inputs' fileLocationEnv differ)",
    "POST /api/webhooks": "the URL's host must resolve, its types and runs must be able to match",
}
"""Operations where a schema-valid body can name something that does not exist (answered 400)."""


ENDLESS = "/api/events"
"""The live stream of every event never ends (a client leaves it); a filter matching nothing
would hold each generated request until its timeout. ``tests/test_event_stream.py`` covers it;
here only its document entry is checked (``tests/test_openapi_document.py``)."""


def _config(base_url: str) -> SchemathesisConfig:
    config = SchemathesisConfig.from_dict({
        "seed": 20261202,
        "base-url": base_url,
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        "request-timeout": 20,
        "max-stream-events": 2,  # the SSE routes stream until the client leaves
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "operations": [
            {"include-name": name, "checks": {"positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "400", "401", "403", "404", "409"]}}}
            for name in REGISTRY_REFERENCES
        ],
    })
    config.projects.override.checks.update(included_check_names=["all"])
    return config


def fuzz(base_url: str, document: dict[str, Any]) -> tuple[list[str], int]:
    """Run schemathesis' engine (blocking HTTP, so in a worker thread): the failures and errors
    it found, one line each, and how many operations it tested."""
    schema = schemathesis.openapi.from_dict(document, config=_config(base_url)).exclude(
        path=ENDLESS, method="GET")
    problems: set[str] = set()
    tested: set[str] = set()
    for event in from_schema(schema).execute():
        if isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
            recorder = event.recorder
            for case_id, checks in recorder.checks.items():
                case = recorder.cases[case_id].value
                tested.add(case.operation.label)
                for check in checks:
                    if check.status == Status.FAILURE:
                        info = check.failure_info
                        title = f"{info.failure.title}: {info.failure.message[:300]}" if info is not None else ""
                        problems.add(f"{case.method} {case.path}: {check.name}: {title}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            problems.add(f"error: {getattr(event, 'label', '')}: {event.info.format() if hasattr(event, 'info') else event}")
    return sorted(problems), len(tested)


@pytest.mark.timeout(240)
async def test_schemathesis_all_checks_find_nothing(make_service, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    api: Api = await make_service(api_token_file=token_file)
    status, document = await api.call("GET", "/api/openapi.json")
    assert status == 200
    operations = sum(len(methods) for methods in document["paths"].values())
    # the service runs on this event loop; schemathesis' blocking client in a worker thread
    problems, tested = await asyncio.to_thread(fuzz, str(api.service.api_url).rstrip("/"), document)
    assert problems == [], "\n".join(problems)
    assert tested == operations - 1  # all but ENDLESS
