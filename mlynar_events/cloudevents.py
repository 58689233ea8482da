"""The public face of a stored event: a CloudEvent (spec 1.0, structured JSON mode).

Everything an integration receives (the SSE stream, webhooks) is this one rendering, so a
receiver can parse it with any CloudEvents SDK unchanged. The mapping:

* ``id`` is the event's id (the envelope's, stable across redeliveries and replays);
* ``type`` is ``dev.mlynar.<event_type>`` (the stable catalogue name, never the class name);
* ``subject`` is the aggregate's key: the run id, or the data kind / operator / machine name;
* ``source`` names the stream, ``time`` is the append time;
* the extensions ``sequence`` (the stream position: what a subscriber resumes after) and
  ``actor`` (who caused it) make the event an audit record. ``sequence`` follows the CloudEvents
  sequence extension: a string that orders lexicographically, so it is the stream sequence
  zero-padded to 20 digits (``sequencetype`` is not set: the stream has gaps where other
  subjects' events are, so it is not the extension's contiguous ``Integer``).

The data is the event's own payload as stored (at its current schema, upcast), which never holds
a secret: machines carry a reference to their token, not the token.
"""

from __future__ import annotations

import json
from typing import Any

from .events import StoredEvent

SPEC_VERSION = "1.0"
TYPE_PREFIX = "dev.mlynar."
SOURCE = "urn:mlynar-events:stream:MLYNAR"
CONTENT_TYPE = "application/cloudevents+json"


def sequence_text(seq: int) -> str:
    """The ``sequence`` extension's value: ``seq`` as a lexicographically ordered string."""
    return f"{seq:020d}"


def cloudevent(stored: StoredEvent) -> dict[str, Any]:
    """``stored`` as a structured-mode CloudEvent (a JSON-able dict)."""
    event = stored.event
    return {
        "specversion": SPEC_VERSION,
        "id": stored.envelope.id,
        "source": SOURCE,
        "type": TYPE_PREFIX + event.event_type,
        "subject": event.key(),
        "time": stored.time.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": event.model_dump(mode="json"),
        "sequence": sequence_text(stored.seq),
        "actor": stored.envelope.actor,
    }


def cloudevent_json(stored: StoredEvent) -> str:
    """The CloudEvent as compact JSON text (what is sent: SSE ``data:`` and webhook bodies)."""
    return json.dumps(cloudevent(stored), separators=(",", ":"), ensure_ascii=False)
