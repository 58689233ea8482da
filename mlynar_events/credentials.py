"""Per-step credentials: what a Kubernetes step Job presents to the API to fetch its inputs and
return its outputs (``/api/run/{run}/returns/{step}/...``).

A credential is HMAC-SHA256 over (run, step, attempt) with the server key ``server.hmac`` from the
secret store, so every API replica can check it without storing anything per step, and it is
worthless for any other step or attempt. It is never written into an event; the executor hands it
to the Job through a Kubernetes Secret. The API additionally accepts it only while that attempt is
running, so a leaked credential of a finished step opens nothing.
"""

from __future__ import annotations

import hashlib
import hmac

KEY_NAME = "server.hmac"


def step_credential(key: str, run_id: str, step_id: str, attempt: int) -> str:
    message = f"mlynar-step-credential\n{run_id}\n{step_id}\n{int(attempt)}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def verify(key: str, run_id: str, step_id: str, attempt: int, given: str) -> bool:
    expected = step_credential(key, run_id, step_id, attempt)
    return hmac.compare_digest(expected.encode(), (given or "").strip().encode())
