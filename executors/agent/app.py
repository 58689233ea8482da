"""The agent's HTTP API (``/v1``) and the embeddable :func:`start_agent`.

Every endpoint needs ``Authorization: Bearer <token>`` (401 missing, 403 wrong; constant-time
compare). Errors are ``{"error": ..., "detail": ...}``; bad input is always a 4xx.

* ``GET /v1/healthz`` -> ``{"status": "ok", "version", "running", "queued", "maxParallel",
  "isolation": "bwrap"|"none", "isolationReason", "runAs", "limits", "read", "write"}``
* ``PUT /v1/steps/{step_id}`` multipart: part ``manifest`` (JSON, :class:`.models.StepManifest`),
  then one part per input named like the input. New step -> 202, same manifest as an existing
  step -> 200 (nothing is started again; this is how an executor re-attaches), different
  manifest -> 409, a concurrent upload of the same id -> 409, too large -> 413.
* ``GET /v1/steps/{step_id}[?wait=S]`` status (:class:`.models.StepStatus`), long-poll 0 < S <= 60
* ``GET /v1/steps/{step_id}/outputs/{n}`` (409 unless succeeded), ``GET .../logs``
* ``DELETE /v1/steps/{step_id}`` kills the step's whole process tree and removes the sandbox.

Decisions: uploads are staged under ``<work-dir>/tmp`` and renamed into ``steps/`` only when
complete, so a failed or aborted upload leaves nothing; when the step's main process exits,
anything it left running is killed (:mod:`.isolation`); outputs and logs are served only as
regular single-link files of the sandbox, through the descriptor that was checked; a step id
that was deleted (or whose result expired, ``--result-ttl``) is unknown again, so a later PUT
runs it anew.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiofiles
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import ValidationError

from . import __version__
from mlynar_events.netaddr import is_loopback

from .models import StepManifest, valid_step_id
from .runner import StepManager, open_output
from .sandbox import StepDir, UnsafeFile, open_regular, remove_tree
from .settings import AgentSettings

log = logging.getLogger("mlynar.agent")

CHUNK = 256 * 1024
MAX_WAIT = 60.0

MANAGER = web.AppKey("manager", StepManager)
TOKEN = web.AppKey("token", str)  # "" = no auth (--insecure-no-auth on loopback)
SETTINGS = web.AppKey("settings", AgentSettings)


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


def _json_error(status: int, error: str, detail: Any = None, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


# --- middlewares ------------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except ApiError as e:
        return _json_error(e.status, e.error, e.detail)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _json_error(e.status, e.reason, None, headers={k: v for k, v in e.headers.items() if k.lower() == "allow"})
    except asyncio.CancelledError:
        raise
    except (ConnectionError, asyncio.IncompleteReadError, HttpProcessingError) as e:
        # the client went away or sent a broken body mid-request; any upload was cleaned up
        log.info("%s %s: request aborted: %s", request.method, request.path, e)
        return _json_error(400, "request aborted", str(e))
    except Exception:
        log.exception("internal error handling %s %s", request.method, request.path)
        return _json_error(500, "internal error", None)


@web.middleware
async def door_middleware(request: web.Request, handler):
    """Only the executor talks to an agent, never a browser: a request with an ``Origin`` is a
    web page's (a cross-site request, or DNS rebinding) and is refused; without a token
    (``--insecure-no-auth``, loopback only) the Host must be a loopback name too, so a page that
    rebinds its own name to 127.0.0.1 cannot submit steps."""
    if "Origin" in request.headers:
        return _json_error(403, "cross-origin requests are refused", "the agent is called by the executor, not by browsers")
    if not request.app[TOKEN] and not is_loopback(request.url.host or ""):
        return _json_error(403, "unexpected Host", f"{request.host!r} is not a loopback name")
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    token = request.app[TOKEN]
    if token:
        header = request.headers.get("Authorization")
        if not header:
            return _json_error(401, "missing bearer token", "send 'Authorization: Bearer <token>'",
                               headers={"WWW-Authenticate": 'Bearer realm="mlynar-agent"'})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return _json_error(401, "malformed Authorization header", "expected 'Bearer <token>'",
                               headers={"WWW-Authenticate": 'Bearer realm="mlynar-agent"'})
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")):
            return _json_error(403, "wrong bearer token", None)
    return await handler(request)


# --- helpers ----------------------------------------------------------------------------------


def _step_id(request: web.Request) -> str:
    step_id = request.match_info["step_id"]
    if not valid_step_id(step_id):
        raise ApiError(400, "invalid step id", f"{step_id!r} must match ^[a-z0-9][a-z0-9-]{{0,127}}$")
    return step_id


def _existing(request: web.Request, step_id: str):
    step = request.app[MANAGER].get(step_id)
    if step is None:
        raise ApiError(404, "unknown step", step_id)
    return step


def _validation_detail(e: ValidationError) -> list[dict]:
    return [
        {"loc": [str(p) for p in err["loc"]], "msg": err["msg"]}
        for err in e.errors(include_url=False, include_input=False)
    ]


class _Budget:
    """Counts uploaded bytes against --max-input-bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise ApiError(413, "upload too large", f"the inputs exceed --max-input-bytes {self.limit}")


async def _drain(reader, limit: int) -> None:
    """Read and discard the rest of a multipart body (bounded), so the client gets its answer
    without a broken pipe."""
    seen = 0
    try:
        while seen <= limit:
            part = await reader.next()
            if part is None:
                return
            while chunk := await part.read_chunk(CHUNK):
                seen += len(chunk)
                if seen > limit:
                    return
    except (ValueError, AssertionError, asyncio.IncompleteReadError, ConnectionError):
        return


_ALLOWED_TRANSFER_ENCODINGS = {"", "binary", "8bit", "7bit"}


# --- handlers ---------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    assert manager.isolation is not None
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "running": manager.count("running"),
            "queued": manager.count("queued"),
            "maxParallel": manager.settings.max_parallel,
            **manager.isolation.public(),
        }
    )


async def put_step(request: web.Request) -> web.Response:
    step_id = _step_id(request)
    manager = request.app[MANAGER]
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_input_bytes + settings.max_manifest_bytes:
        raise ApiError(413, "upload too large",
                       f"Content-Length {request.content_length} exceeds --max-input-bytes {settings.max_input_bytes}")
    if request.content_type != "multipart/form-data":
        raise ApiError(400, "expected multipart/form-data", f"got Content-Type {request.content_type!r}")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as e:
        raise ApiError(400, "malformed multipart body", str(e)) from e

    # 1. the manifest
    try:
        part = await reader.next()
    except (ValueError, AssertionError) as e:
        raise ApiError(400, "malformed multipart body", str(e)) from e
    if part is None or getattr(part, "name", None) != "manifest":
        raise ApiError(400, "the first multipart part must be named 'manifest'",
                       None if part is None else f"got {getattr(part, 'name', None)!r}")
    raw = bytearray()
    try:
        while chunk := await part.read_chunk(CHUNK):
            raw += chunk
            if len(raw) > settings.max_manifest_bytes:
                raise ApiError(413, "manifest too large", f"the manifest exceeds {settings.max_manifest_bytes} bytes")
    except ValueError as e:
        raise ApiError(400, "malformed multipart body", str(e)) from e
    try:
        manifest = StepManifest.model_validate(json.loads(bytes(raw)))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if isinstance(e, ValidationError):
            raise ApiError(400, "invalid manifest", _validation_detail(e)) from e
        raise ApiError(400, "manifest is not valid JSON", str(e)) from e

    # 2. idempotence: an existing step is never started again
    existing = manager.get(step_id)
    if existing is not None:
        await _drain(reader, settings.max_input_bytes)
        if existing.manifest.canonical() == manifest.canonical():
            log.info("step %s: re-PUT with the same manifest; not starting it again", step_id)
            return web.json_response(existing.status.public(), status=200)
        raise ApiError(409, "step exists with a different manifest",
                       {"step": step_id, "existing": existing.manifest.canonical()})
    if step_id in manager.uploading:
        raise ApiError(409, "an upload of this step is in progress", step_id)
    if manager.stopping.is_set():
        raise ApiError(503, "agent is stopping", None)

    # 3. the input files, streamed to a staging directory that is removed on any failure
    manager.uploading.add(step_id)
    staged: StepDir | None = None
    try:
        staged = await asyncio.to_thread(manager.new_upload_dir, step_id)
        specs = {spec.name: spec for spec in manifest.inputs}
        received: set[str] = set()
        budget = _Budget(settings.max_input_bytes)
        while True:
            try:
                part = await reader.next()
            except (ValueError, AssertionError) as e:
                raise ApiError(400, "malformed multipart body", str(e)) from e
            if part is None:
                break
            name = getattr(part, "name", None)
            if name not in specs:
                raise ApiError(400, "unexpected multipart part",
                               f"part {name!r} is not an input of the manifest (inputs: {sorted(specs)})")
            if name in received:
                raise ApiError(400, "duplicate multipart part", f"input {name!r} was sent twice")
            cte = part.headers.get("Content-Transfer-Encoding", "").strip().lower()
            if cte not in _ALLOWED_TRANSFER_ENCODINGS:
                raise ApiError(400, "unsupported Content-Transfer-Encoding", f"part {name!r}: {cte!r}")
            spec = specs[name]
            target = staged.input_file(spec.name, spec.filename or spec.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                async with aiofiles.open(target, "wb") as f:
                    while chunk := await part.read_chunk(CHUNK):
                        budget.take(len(chunk))
                        await f.write(chunk)
            except ValueError as e:
                raise ApiError(400, "malformed multipart body", f"part {name!r}: {e}") from e
            received.add(name)
        missing = [n for n in specs if n not in received]
        if missing:
            raise ApiError(400, "missing input part(s)", f"no multipart part for input(s) {missing}")
        step = manager.accept(step_id, manifest, staged)
        staged = None
        return web.json_response(step.status.public(), status=202)
    finally:
        manager.uploading.discard(step_id)
        if staged is not None:
            await asyncio.to_thread(remove_tree, staged.root)


async def get_step(request: web.Request) -> web.Response:
    step_id = _step_id(request)
    wait_raw = request.query.get("wait")
    wait: float | None = None
    if wait_raw is not None:
        try:
            wait = float(wait_raw)
        except ValueError:
            raise ApiError(400, "invalid wait", f"wait must be a number of seconds, got {wait_raw!r}") from None
        if not math.isfinite(wait) or not 0 < wait <= MAX_WAIT:
            raise ApiError(400, "invalid wait", f"wait must be > 0 and <= {MAX_WAIT:g}, got {wait_raw!r}")
    step = _existing(request, step_id)
    if wait is not None and not step.done.is_set():
        manager = request.app[MANAGER]
        log.debug("step %s: long-poll for up to %g s", step_id, wait, extra={"step_id": step_id})
        waiters = [asyncio.ensure_future(step.done.wait()), asyncio.ensure_future(manager.stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        step = _existing(request, step_id)
    return web.json_response(step.status.public())


async def get_output(request: web.Request) -> web.StreamResponse:
    step_id = _step_id(request)
    step = _existing(request, step_id)
    n_raw = request.match_info["n"]
    if not n_raw.isascii() or not n_raw.isdigit():
        raise ApiError(404, "unknown output", f"output index {n_raw!r} is not a non-negative integer")
    if step.status.state != "succeeded":
        raise ApiError(409, "step has not succeeded", {"step": step_id, "state": step.status.state})
    n = int(n_raw)
    if n >= len(step.status.outputs):
        raise ApiError(404, "unknown output", f"step {step_id} has {len(step.status.outputs)} output(s)")
    fd = open_output(step.dir.out, step.status.outputs[n].file)
    if fd is None:
        raise ApiError(409, "output file is gone", f"output {n} of step {step_id} is no longer a file in the sandbox")
    return await _send_fd(request, fd, "application/octet-stream")


async def get_logs(request: web.Request) -> web.StreamResponse:
    step_id = _step_id(request)
    step = _existing(request, step_id)
    try:
        if step.dir.root.resolve() != step.dir.root:
            raise UnsafeFile("the sandbox moved")
        fd = open_regular(step.dir.root, step.dir.logs.name)
    except (UnsafeFile, OSError):
        # the step may have replaced its logs file; never follow it out of the sandbox
        return web.Response(body=b"", content_type="text/plain")
    return await _send_fd(request, fd, "text/plain; charset=utf-8")


async def _send_fd(request: web.Request, fd: int, content_type: str) -> web.StreamResponse:
    """Stream the file behind ``fd`` (checked by :func:`.sandbox.open_regular`) and close it."""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        resp.content_length = size
        await resp.prepare(request)
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def delete_step(request: web.Request) -> web.Response:
    step_id = _step_id(request)
    if not await request.app[MANAGER].delete(step_id):
        raise ApiError(404, "unknown step", step_id)
    return web.json_response({"deleted": True})


def make_app(settings: AgentSettings, manager: StepManager, token: str | None) -> web.Application:
    app = web.Application(middlewares=[error_middleware, door_middleware, auth_middleware])
    app[MANAGER] = manager
    app[TOKEN] = token or ""
    app[SETTINGS] = settings
    app.router.add_get("/v1/healthz", healthz)
    app.router.add_put("/v1/steps/{step_id}", put_step)
    app.router.add_get("/v1/steps/{step_id}", get_step)
    app.router.add_delete("/v1/steps/{step_id}", delete_step)
    app.router.add_get("/v1/steps/{step_id}/outputs/{n}", get_output)
    app.router.add_get("/v1/steps/{step_id}/logs", get_logs)
    return app


# --- embedding --------------------------------------------------------------------------------


@dataclass
class RunningAgent:
    """A started agent. ``url`` is the bound base URL (without ``/v1``)."""

    url: str
    settings: AgentSettings
    host: str
    port: int
    _runner: web.AppRunner = field(repr=False)
    _manager: StepManager = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    async def stop(self) -> None:
        """Stop: running steps are reported lost and their processes killed (long-polls get that
        answer), then the server stops and the work dir is released."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._manager.shutdown()
            await self._runner.cleanup()
        finally:
            self._manager.close()
        log.info("machine agent at %s stopped", self.url)

    async def __aenter__(self) -> "RunningAgent":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_agent(settings: AgentSettings) -> RunningAgent:
    """Start an agent in the running event loop.

    Raises :class:`~executors.agent.settings.AgentConfigError` when the settings do not allow it
    (no token, work dir in use, ...) and ``OSError`` when the address cannot be bound."""
    token = settings.resolve_token()
    if token is None:
        log.warning("machine agent runs WITHOUT authentication (--insecure-no-auth on %s)", settings.host)
    manager = StepManager(settings)
    manager.open()
    runner = web.AppRunner(make_app(settings, manager, token), shutdown_timeout=2.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
    except BaseException:
        await manager.shutdown()
        await runner.cleanup()
        manager.close()
        raise
    sockname = runner.addresses[0]
    host, port = sockname[0], sockname[1]
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}"
    iso = manager.isolation
    assert iso is not None
    log.info(
        "machine agent %s listening on %s (work dir %s, max parallel %d, isolation %s, steps run as %s%s)",
        __version__, url, manager.work_dir, settings.max_parallel, iso.mode, iso.public()["runAs"],
        f", allow {settings.allow!r}" if settings.allow else "",
        extra={"isolation": iso.mode, "isolation_reason": iso.reason},
    )
    if iso.mode == "none":
        log.warning("steps are NOT isolated (%s): they see every file their user can read; their process trees "
                    "are still killed on DELETE, timeout and stop", iso.reason, extra={"isolation": "none"})
    return RunningAgent(url=url, settings=settings, host=host, port=port, _runner=runner, _manager=manager)
