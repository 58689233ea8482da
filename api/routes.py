"""Every route of the API, in one table: method, path, handler, and the models the OpenAPI
document is generated from."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel

from mlynar_events.lineage import Lineage, Provenance
from mlynar_events.principals import Role
from mlynar_events.specs import DataKindDocument, OperatorDocument
from mlynar_events.webhooks import DeliveryAttempt

from . import events, lineage, machines, registry, returns, runs, tokens, ui, webhooks
from .context import ctx
from .metrics import metrics_page
from .models import (
    Declared, Deleted, DataKindOut, DataUnitOut, Health, MachineCheck, MachineIn, MachineOut,
    MachineUpdate, OperatorOut, ParamOut, ParamPool, ReturnedOutput, RunDeletedOut, RunOut, RunSummary, StepWithAttempts,
)
from .openapi import (
    RAW, TEXT, UPLOAD, Query, boolean, created, download, event_stream, integer, json_request, ok, redirect,
    static,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Access(StrEnum):
    """Who may call a route; the door and the auth middleware read it from the matched route
    (never from the path's text)."""

    API = "api"  # the API token (or anonymous on loopback without a token), same-origin only
    STEP = "step"  # a running Kubernetes step's own credential, checked by the handler (api/returns.py)
    PUBLIC = "public"  # anyone: liveness and the OpenAPI document


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | str | None = None  # a model, or a media type description
    response: Any = None
    errors: tuple[int, ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    access: Access = Access.API
    role: Role | None = None  # the weakest role that may call it (Access.API routes); None: see `needs`

    @property
    def needs(self) -> Role:
        """Reads need ``viewer``, writes ``member``, unless the route says otherwise (the
        registry and tokens are ``admin``'s, webhooks ``member``'s). Which runs, machines and
        webhooks a member may act on is checked by the handlers (``api/principal.py``,
        ``api/machines.py``, ``api/webhooks.py``)."""
        if self.role is not None:
            return self.role
        return Role.VIEWER if self.method in {"GET", "HEAD"} else Role.MEMBER


HEALTH_NATS_TIMEOUT = 2.0


async def healthz(request: web.Request) -> web.Response:
    """Liveness that means something: 503 while NATS is disconnected (or does not answer within
    :data:`HEALTH_NATS_TIMEOUT`), so a probe sees what a command would; the projector's lag is
    reported alongside."""
    c = ctx(request)
    position = c.projector.position
    head: int | None = None
    if c.store.nc.is_connected:
        try:
            head = await asyncio.wait_for(c.store.last_seq(), HEALTH_NATS_TIMEOUT)
        except Exception:  # noqa: BLE001 - any failure to answer is "not connected" to a probe
            head = None
    if head is None:
        body = Health(status="unavailable", position=position, nats="disconnected")
        return web.json_response(body.model_dump(), status=503)
    body = Health(status="ok", position=position, nats="connected", head=head, lag=max(0, head - position))
    return web.json_response(body.model_dump())


async def openapi(request: web.Request) -> web.Response:
    from .openapi import document

    return web.json_response(document(ROUTES))


async def api_json(request: web.Request) -> web.Response:
    """The same document where the original Mlynar (NestJS) serves it."""
    return await openapi(request)


DOCUMENT = ok({"type": "object"}, "The OpenAPI 3.1 document of this API")
NOT_CHANGED = "Already declared as it is (nothing changed)"
SEQUENCE = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
EVENT_TYPES = Query("type", {"type": "string", "enum": sorted(events.CATALOGUE)}, repeated=True,
                    description="only events of these types")


RUN = "/api/run/{run_id}"
WEBHOOK = "/api/webhooks/{webhook_id}"
ROUTES: list[Route] = [
    Route("GET", "/healthz", healthz, "Liveness and the projection's position", response=Health,
          access=Access.PUBLIC),
    Route("GET", "/api/openapi.json", openapi, "This document", response=DOCUMENT, access=Access.PUBLIC),
    Route("GET", "/api-json", api_json, "This document (the original Mlynar's address)", response=DOCUMENT,
          access=Access.PUBLIC),
    Route("GET", "/api", ui.swagger_page, "Swagger UI on this document", response=static("text/html"),
          access=Access.PUBLIC),
    Route("GET", "/metrics", metrics_page, "This process's metrics in the Prometheus text format (docs/METRICS.md)"),
    # the web view's static shell holds no data (its data calls are ordinary API calls with the token)
    Route("GET", "/ui", ui.ui_redirect, "The web view (redirects to /ui/)", response=redirect(308),
          access=Access.PUBLIC),
    Route("GET", "/ui/", ui.ui_index, "The web view's page", response=static("text/html"), access=Access.PUBLIC),
    Route("GET", "/ui/{name}", ui.ui_file, "A file of the web view", response=static(*ui.MEDIA_TYPES),
          errors=(404,), access=Access.PUBLIC),
    Route("GET", "/ui/vendor/{name}", ui.ui_vendor_file, "A vendored library of the web view",
          response=static(*ui.MEDIA_TYPES), errors=(404,), access=Access.PUBLIC),
    Route("GET", "/api/runs", runs.list_runs, "List runs, newest first", response=list[RunSummary],
          query=(integer("limit", 1, 1000), integer("offset", 0, runs.MAX_OFFSET))),
    Route("POST", "/api/run", runs.create_run, "Create an empty run", response=created(RunOut)),
    Route("GET", RUN, runs.get_run, "A run with its data pool and steps (?at=<seq>: as it was right after that event)",
          response=RunOut, errors=(400, 404), query=(Query("at", {**SEQUENCE, "minimum": 1}),)),
    Route("DELETE", RUN, runs.delete_run, "Delete a run and its data", response=RunDeletedOut,
          errors=(404, 409, 503)),
    Route("POST", RUN + "/upload/{data_kind}", runs.upload, "Add a file to the run's pool as a data kind",
          body=UPLOAD, response=created(DataUnitOut), errors=(400, 404, 409, 413)),
    Route("GET", RUN + "/params", runs.params, "Operators reachable from the pool with their parameters",
          response=dict[str, list[ParamOut]], errors=(404,)),
    Route("POST", RUN + "/run", runs.start_run, "Start the run with a param pool",
          body=json_request(ParamPool, required=False, description="the param pool (none: every default)"),
          response=RunOut, errors=(400, 404, 409), query=(integer("maxParallel", 1, 10_000),)),
    Route("POST", RUN + "/terminate", runs.terminate_run, "Stop scheduling; cancel=true also cancels running steps",
          response=RunOut, errors=(404, 409), query=(boolean("cancel"),)),
    Route("GET", "/api/events", events.events, "Every event as Server-Sent Events (CloudEvents in data:); "
          "resumes after Last-Event-ID", response=event_stream(), errors=(400,),
          query=(Query("run", {"type": "string", "format": "uuid"}, repeated=True, description="only these runs"),
                 EVENT_TYPES, Query("after", SEQUENCE))),
    Route("GET", RUN + "/events", events.run_events, "One run's events: SSE with Accept: text/event-stream "
          "(ends after the run's final event), else its history", response=event_stream(events.History),
          errors=(400, 404), query=(EVENT_TYPES, Query("after", SEQUENCE), integer("limit", 1, 10_000))),
    Route("GET", RUN + "/history", events.history, "The run's events in order (sequence, id, type, time, actor, data)",
          response=events.History, errors=(400, 404), query=(Query("after", SEQUENCE), integer("limit", 1, 10_000))),
    Route("GET", RUN + "/lineage", lineage.get_lineage, "The run's data flow: units and steps, unit → step → unit",
          response=Lineage, errors=(404,)),
    Route("GET", RUN + "/units/{unit_id}/provenance", lineage.get_provenance,
          "A unit's chain back to its uploads, with each step's operator revision and parameters",
          response=Provenance, errors=(404,)),
    Route("GET", RUN + "/steps/{step_id}", runs.get_step, "One step with its attempts",
          response=StepWithAttempts, errors=(404,)),
    Route("GET", RUN + "/steps/{step_id}/logs", runs.step_logs, "A step's logs (latest attempt)",
          response=TEXT, errors=(404,), query=(integer("attempt", 1, 1000),)),
    Route("GET", RUN + "/returns/{step_id}/inputs/{index}", returns.get_input,
          "A running Kubernetes step fetches an input (step credential)", response=download(ranges=False),
          errors=(400, 401, 403, 404, 409), query=(integer("attempt", 1, 1000, required=True),), access=Access.STEP),
    Route("POST", RUN + "/returns/{step_id}/{data_kind}", returns.return_output,
          "A running Kubernetes step returns an output (step credential)", body=RAW,
          response=created(ReturnedOutput, unchanged="Already returned with the same bytes"),
          errors=(400, 401, 403, 404, 409, 413),
          query=(integer("attempt", 1, 1000, required=True), integer("index", 0, returns.MAX_OUTPUTS - 1, required=True),
                 Query("filename", {"type": "string"})), access=Access.STEP),
    Route("GET", "/static/{run_id}/data/{unit_id}", runs.unit_data, "A data unit's bytes (Range requests served)",
          response=download(), errors=(404,)),
    Route("HEAD", "/static/{run_id}/data/{unit_id}", runs.unit_data, "A data unit's size and type",
          response=download(head=True), errors=(404,)),
    Route("GET", "/api/run/data-unit/{unit_id}", runs.unit_data,
          "A data unit's bytes by its id alone (the original Mlynar's current route)", response=download(),
          errors=(404,)),
    Route("HEAD", "/api/run/data-unit/{unit_id}", runs.unit_data, "A data unit's size and type",
          response=download(head=True), errors=(404,)),
    Route("GET", "/api/data-kinds", registry.list_data_kinds, "Declared data kinds", response=list[DataKindOut]),
    Route("POST", "/api/data-kinds", registry.declare_data_kind, "Declare a DataKind document",
          body=json_request(DataKindDocument), response=created(Declared, unchanged=NOT_CHANGED), errors=(400,), role=Role.ADMIN),
    Route("DELETE", "/api/data-kinds/{name}", registry.delete_data_kind, "Delete a data kind", response=Deleted,
          errors=(404, 409), role=Role.ADMIN),
    Route("GET", "/api/operators", registry.list_operators, "Declared operators", response=list[OperatorOut]),
    Route("POST", "/api/operators", registry.declare_operator, "Declare an Operator document",
          body=json_request(OperatorDocument), response=created(Declared, unchanged=NOT_CHANGED), errors=(400,), role=Role.ADMIN),
    Route("DELETE", "/api/operators/{name}", registry.delete_operator, "Delete an operator", response=Deleted,
          errors=(404,), role=Role.ADMIN),
    Route("GET", "/api/machines", machines.list_machines, "Registered machines", response=list[MachineOut]),
    Route("POST", "/api/machines", machines.register_machine, "Register a machine (its agent's URL and token)",
          body=MachineIn, response=created(MachineOut), errors=(400, 409)),
    Route("GET", "/api/machines/{name}", machines.get_machine, "One machine", response=MachineOut, errors=(404,)),
    Route("PUT", "/api/machines/{name}", machines.update_machine, "Change a machine's URL, token or labels",
          body=MachineUpdate, response=MachineOut, errors=(400, 404)),
    Route("DELETE", "/api/machines/{name}", machines.delete_machine, "Unregister a machine", response=Deleted,
          errors=(404,)),
    Route("POST", "/api/machines/{name}/check", machines.check_machine, "Call the machine agent's health endpoint",
          response=MachineCheck, errors=(404,)),
    Route("GET", "/api/webhooks", webhooks.list_webhooks, "Webhooks", response=list[webhooks.WebhookOut],
          role=Role.MEMBER),
    Route("POST", "/api/webhooks", webhooks.create_webhook, "Subscribe a URL to events (answers its secret, once)",
          body=webhooks.WebhookIn, response=created(webhooks.WebhookWithSecret), errors=(400,), role=Role.MEMBER),
    Route("GET", WEBHOOK, webhooks.get_webhook, "One webhook", response=webhooks.WebhookOut, errors=(404,),
          role=Role.MEMBER),
    Route("DELETE", WEBHOOK, webhooks.delete_webhook, "Delete a webhook", response=Deleted, errors=(404,), role=Role.MEMBER),
    Route("GET", WEBHOOK + "/deliveries", webhooks.list_deliveries, "Its last delivery attempts, newest first",
          response=list[DeliveryAttempt], errors=(404,), role=Role.MEMBER),
    Route("POST", WEBHOOK + "/rotate-secret", webhooks.rotate_secret,
          "A new signing secret; the old one still signs for the grace period",
          body=json_request(webhooks.RotateIn, required=False), response=created(webhooks.RotatedSecret),
          errors=(400, 404, 409), role=Role.MEMBER),
    Route("POST", WEBHOOK + "/enable", webhooks.enable_webhook, "Deliver again to a failing webhook",
          response=webhooks.WebhookOut, errors=(404,), role=Role.MEMBER),
    Route("GET", "/api/tokens", tokens.list_tokens, "API tokens (never the tokens themselves)",
          response=list[tokens.TokenOut], role=Role.ADMIN),
    Route("POST", "/api/tokens", tokens.create_token, "Create a token for a principal with a role (answers it, once)",
          body=tokens.TokenIn, response=created(tokens.TokenWithSecret), errors=(400,), role=Role.ADMIN),
    Route("DELETE", "/api/tokens/{token_id}", tokens.revoke_token, "Revoke a token (refused from this answer on)",
          response=tokens.TokenOut, errors=(404,), role=Role.ADMIN),
]


ROUTE_TABLE: web.AppKey[dict[web.AbstractRoute, Route]] = web.AppKey("routes", dict)


def add_routes(app: web.Application, routes: list[Route] = ROUTES) -> None:
    app[ROUTE_TABLE] = {app.router.add_route(r.method, r.path, r.handler): r for r in routes}


def route_of(request: web.Request) -> Route | None:
    """The table's entry of the route aiohttp matched (``None`` for an unknown path or method).
    Matching is aiohttp's, on the decoded path, so ``%2F`` tricks cannot change which route
    (and so which access rule) a request gets."""
    return request.app[ROUTE_TABLE].get(request.match_info.route)
