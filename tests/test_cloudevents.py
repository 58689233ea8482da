"""The one public rendering of an event parses with the CloudEvents SDK unchanged."""

from __future__ import annotations

import json

from cloudevents.core.formats.json import JSONFormat

from mlynar_events.cloudevents import cloudevent_json, sequence_text
from mlynar_events.events import Envelope, MachineRegistered, RunCreated, StoredEvent


def parse(text: str):  # type: ignore[no-untyped-def]
    """What a receiver does: the SDK's JSON format, which validates every attribute."""
    return JSONFormat().read(None, text)


def stored(event, seq: int, actor: str = "alice") -> StoredEvent:
    return StoredEvent(seq=seq, subject=event.subject(), envelope=Envelope.wrap(event, actor), event=event)


def test_a_run_event_is_a_structured_cloudevent() -> None:
    s = stored(RunCreated(run_id="6f7c0f36-5f3e-4a8b-9d2c-1a2b3c4d5e6f", owner="alice"), 42)
    ce = parse(cloudevent_json(s))
    assert ce.get_specversion() == "1.0" and ce.get_id() == s.envelope.id
    assert ce.get_type() == "dev.mlynar.RunCreated" and ce.get_subject() == "6f7c0f36-5f3e-4a8b-9d2c-1a2b3c4d5e6f"
    assert ce.get_extension("sequence") == "00000000000000000042" and ce.get_extension("actor") == "alice"
    assert ce.get_time() == s.time
    assert ce.get_data() == {"run_id": "6f7c0f36-5f3e-4a8b-9d2c-1a2b3c4d5e6f", "owner": "alice"}


def test_sequences_order_as_text_and_no_secret_is_rendered() -> None:
    assert sorted([sequence_text(10), sequence_text(9), sequence_text(100)]) == [
        sequence_text(9), sequence_text(10), sequence_text(100)]
    s = stored(MachineRegistered(name="gpu", url="http://10.0.0.5:8080", labels={}, token_ref="secret:machine.gpu"), 7)
    body = json.loads(cloudevent_json(s))
    assert body["subject"] == "gpu" and body["data"]["token_ref"] == "secret:machine.gpu"
