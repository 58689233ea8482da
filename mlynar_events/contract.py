"""The stream as a public contract: a JSON Schema of the envelope and of every event's data,
generated from the event classes (the one definition), so a consumer in another language can
follow ``mlynar.run.*.StepSucceeded`` with its own JetStream consumer and validate what it reads.

``docs/events.schema.json`` is this module's output, checked in and compared with the code by
``tests/test_contract.py``; after changing an event class, regenerate it with
``python -m mlynar_events.contract > docs/events.schema.json``. How versions evolve is in
``docs/EVENTS.md``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .events import CATALOGUE, SUBJECT_PREFIX, Envelope

SCHEMA_ID = "https://mlynar.dev/schemas/events.schema.json"


def json_schema() -> dict[str, Any]:
    """One document: ``$defs.Envelope`` and, per event type, ``$defs.<EventType>`` (its data at
    the current schema version, with ``x-mlynar-schema-version``, ``x-mlynar-aggregate`` and
    ``x-mlynar-subject``)."""
    defs: dict[str, Any] = {}
    events: dict[str, Any] = {}
    for name in sorted(CATALOGUE):
        cls = CATALOGUE[name]
        schema = cls.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        schema["title"] = name
        schema["x-mlynar-schema-version"] = cls.schema_version
        schema["x-mlynar-aggregate"] = cls.aggregate
        schema["x-mlynar-subject"] = f"{SUBJECT_PREFIX}.{cls.aggregate}.<key>.{name}"
        events[name] = schema
    envelope = Envelope.model_json_schema(by_alias=True)
    envelope["properties"]["type"]["enum"] = sorted(CATALOGUE)
    overlap = set(defs) & set(events)
    if overlap:
        raise TypeError(f"model names clash with event types: {sorted(overlap)}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Mlynar Events stream",
        "description": "Every message on the MLYNAR stream is an Envelope (subject "
                       f"{SUBJECT_PREFIX}.<aggregate>.<key>.<type>); its data is the $defs entry named by its type.",
        "$ref": "#/$defs/Envelope",
        "$defs": {"Envelope": envelope, **defs, **events},
    }


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
