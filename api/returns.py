"""The path of a Kubernetes step's data through the API: the step Job's wrapper fetches the step's
inputs and returns its outputs here (the Job has no access to NATS or the blob store).

* ``GET  /api/run/{run}/returns/{step}/inputs/{index}?attempt=N`` streams input ``index``;
* ``POST /api/run/{run}/returns/{step}/{dataKind}?attempt=N&index=i&filename=f`` streams the body
  into the blob store and appends ``StepOutputReturned``.

These routes do not take the API token (their route's access is ``STEP``, see ``api/routes.py``); they take the step's
own credential, ``Authorization: Bearer <HMAC(server key, run, step, attempt)>``
(:mod:`mlynar_events.credentials`), and only while that attempt of the step is running.
401 no credential, 403 wrong credential, 404 unknown run/step/input, 409 attempt not running or
index already returned with other bytes, 400 bad parameters or a kind outside the operator's
``possibleOutputKinds``, 413 too large.
"""

from __future__ import annotations

import logging
import uuid

from aiohttp import web

from mlynar_events import credentials
from mlynar_events import runs as commands
from mlynar_events.blobs import BlobTooLarge
from mlynar_events.errors import CommandError, Conflict, NotFound
from mlynar_events.events import Event, StepOutputReturned
from mlynar_events.runstate import RunState, StepState, returned_outputs

from .body import BodyClock
from .context import ApiContext, ctx
from .errors import BadRequest, CommandTooLarge, int_param
from .render import blob_response
from .uploads import safe_filename

log = logging.getLogger("mlynar.api.returns")
MAX_OUTPUTS = 10_000


class _Denied(CommandError):
    """401/403 of a step credential (answered by the errors middleware like any command error)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _authenticate(request: web.Request, c: ApiContext) -> tuple[str, str, int]:
    """(run_id, step_id, attempt) once the bearer credential matches them."""
    run_id, step_id = request.match_info["run_id"], request.match_info["step_id"]
    try:
        run_id = str(uuid.UUID(run_id))
    except ValueError:
        raise NotFound(f"run {run_id!r} does not exist") from None
    header = request.headers.get("Authorization", "")
    if not header:
        raise _Denied(401, "missing bearer credential of the step")
    scheme, _, given = header.partition(" ")
    attempt = int_param(request, "attempt", 1, 1000)
    key = await c.secrets.get_or_create(credentials.KEY_NAME)
    if scheme.lower() != "bearer" or not credentials.verify(key, run_id, step_id, attempt, given):
        raise _Denied(403, f"the credential is not valid for step {step_id!r} attempt {attempt} of run {run_id!r}")
    return run_id, step_id, attempt


def _running_step(state: RunState, step_id: str, attempt: int) -> StepState:
    step = state.steps.get(step_id)
    if step is None:
        raise NotFound(f"step {step_id!r} of run {state.run_id!r} does not exist")
    if step.status != "running" or step.attempt != attempt:
        now = f"attempt {step.attempt} is {step.status}" if step.attempt else f"it is {step.status}"
        raise Conflict(f"step {step_id!r} is not running attempt {attempt} ({now})",
                       {"status": step.status, "attempt": step.attempt})
    return step


async def _running_attempt(request: web.Request, c: ApiContext) -> tuple[str, str, int, StepState]:
    """The step attempt the credential names, while it runs: 401/403, 404, 409 otherwise."""
    run_id, step_id, attempt = await _authenticate(request, c)
    return run_id, step_id, attempt, _running_step(await commands.load_run(c.runs, run_id), step_id, attempt)


async def get_input(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    _, step_id, _, step = await _running_attempt(request, c)
    raw = request.match_info["index"]
    try:
        index = int(raw)
    except ValueError:
        raise BadRequest(f"input index must be an integer, got {raw!r}") from None
    inputs = step.scheduled.inputs
    if not 0 <= index < len(inputs):
        raise NotFound(f"step {step_id!r} has {len(inputs)} input(s); there is no input {index}")
    inp = inputs[index]
    return await blob_response(c, inp.blob, inp.filename)


async def return_output(request: web.Request) -> web.Response:
    c = ctx(request)
    run_id, step_id, attempt, step = await _running_attempt(request, c)
    kind = request.match_info["data_kind"]
    index = int_param(request, "index", 0, MAX_OUTPUTS - 1)
    filename = safe_filename(request.query.get("filename"))
    allowed = step.scheduled.spec.possibleOutputKinds
    if kind not in allowed:
        raise BadRequest(f"operator {step.scheduled.operator!r} may not output data kind {kind!r}; "
                         f"its possibleOutputKinds are {sorted(allowed)}")
    if request.content_length is not None and request.content_length > c.settings.max_upload_bytes:
        raise CommandTooLarge(c.settings.max_upload_bytes)
    # a key of its own per upload: a retried upload never overwrites bytes an event points at
    key = f"runs/{run_id}/returns/{step_id}-{attempt}/{index}-{uuid.uuid4().hex[:12]}"
    try:
        chunks = BodyClock(request, c.settings).chunks(request.content.iter_chunked(1024 * 1024))
        info = await c.blobs.put_stream(key, chunks, max_bytes=c.settings.max_upload_bytes)
    except BlobTooLarge:
        raise CommandTooLarge(c.settings.max_upload_bytes) from None
    event = StepOutputReturned(run_id=run_id, step_id=step_id, attempt=attempt, index=index, data_kind=kind,
                               blob=key, size=info.size, sha256=info.sha256, filename=filename)
    existing: list[StepOutputReturned] = []

    def decide(s: RunState) -> Event | None:
        _running_step(s, step_id, attempt)
        return event

    try:
        events, _ = await c.store.load_run(run_id)
        before = returned_outputs(events, step_id, attempt).get(index)
        if before is not None:
            existing.append(before)
        else:
            await commands.decide_and_append(c.store, c.runs, run_id, decide, f"step:{step_id}:{attempt}",
                                    msg_id=f"{step_id}:returned:{attempt}:{index}")
            events, _ = await c.store.load_run(run_id)
            after = returned_outputs(events, step_id, attempt).get(index)
            if after is not None and after.blob != key:  # someone else's upload of the index won
                existing.append(after)
    except BaseException:
        await c.blobs.delete_prefix(key)
        raise
    if existing:
        await c.blobs.delete_prefix(key)
        first = existing[0]
        if first.sha256 != info.sha256 or first.data_kind != kind:
            raise Conflict(f"output {index} of step {step_id!r} attempt {attempt} was already returned "
                           "with other content", {"sha256": first.sha256, "dataKind": first.data_kind})
        event = first
    log.info("step output returned", extra={"run_id": run_id, "step_id": step_id, "attempt": attempt,
                                            "index": index, "kind": kind, "size": info.size})
    return web.json_response({"index": event.index, "dataKind": event.data_kind, "size": event.size,
                              "sha256": event.sha256, "filename": event.filename},
                             status=200 if existing else 201)
