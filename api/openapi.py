"""The OpenAPI 3.1 document, generated from the route table and the pydantic models.

What an operation says is derived from its route wherever the route already knows it, so the
document cannot drift from the service:

* **security** from the route's ``access``: API routes need the bearer token (401 without it,
  403 with a wrong one, or from the door: a foreign Host or Origin); the step routes take the
  step's own credential (its own scheme); public routes say ``security: []``;
* **400** wherever something is validated (a body, a query parameter, a path parameter the
  handler checks), **408**/**413** on every route that reads a body (the body clock and the
  size limits), **503**/**507** on the routes that store data (``api/errors.py::STORAGE_ERRORS``);
* **path parameters** by name, with the format or pattern their handlers enforce
  (:data:`PATH_PARAMETERS`);
* **success answers** from ``Route.response``: a model or type is a 200 JSON answer; the
  descriptors here (:func:`created`, :func:`download`, :data:`TEXT`, :func:`event_stream` ...)
  say the rest (201 where a route creates, binary with ``Range``/206/416, ``text/plain``,
  ``text/event-stream``).

``tests/test_openapi_schemathesis.py`` runs schemathesis with all its checks against a live
service and this document, and ``tests/test_openapi_client.py`` drives a client generated from it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, TypeAdapter

from mlynar_events.names import DNS1123_LABEL, MAX_LABEL

from .errors import STORAGE_ERRORS
from .models import ErrorBody

REF = "#/components/schemas/{model}"
STORAGE = tuple(sorted({status for status, _ in STORAGE_ERRORS.values()}))
"""What a route that stores data answers when the disk refuses (503 read-only, 507 full)."""

NAME = {"type": "string", "pattern": DNS1123_LABEL.pattern, "maxLength": MAX_LABEL}
UUID = {"type": "string", "format": "uuid"}
BINARY = {"type": "string", "format": "binary"}
TEXT_BODY = {"type": "string"}

PATH_PARAMETERS: dict[str, tuple[dict[str, Any], str]] = {
    "run_id": (UUID, "a run's id"),
    "unit_id": (UUID, "a data unit's id"),
    "step_id": ({"type": "string", "pattern": "^[0-9a-f]{20}$"}, "a step's id (20 hex digits)"),
    "data_kind": (NAME, "a data kind's name (DNS-1123 label)"),
    "name": (NAME, "the name (DNS-1123 label)"),
    "webhook_id": ({"type": "string", "pattern": "^[0-9a-f]{32}$"}, "a webhook's id (32 hex digits)"),
    "token_id": ({"type": "string", "pattern": "^tok-[0-9a-f]{12}$"}, "a token's id"),
    "index": ({"type": "integer", "minimum": 0}, "the input's position in the step's inputs"),
}
"""Each path parameter's schema: what its handlers accept (others answer 404, or 400 where the
handler says the value is malformed)."""
PATH_VALIDATED = frozenset({"data_kind", "index"})
"""Path parameters whose handlers answer 400 (not 404) to a malformed value."""


@dataclass(frozen=True)
class Query:
    """A query parameter: its schema says exactly what the handler accepts."""

    name: str
    schema: Mapping[str, Any]
    required: bool = False
    description: str | None = None
    repeated: bool = False  # ?run=a&run=b

    def parameter(self) -> dict[str, Any]:
        schema = {"type": "array", "items": dict(self.schema)} if self.repeated else dict(self.schema)
        out: dict[str, Any] = {"name": self.name, "in": "query", "required": self.required, "schema": schema}
        if self.repeated:
            out.update(style="form", explode=True)
        if self.description:
            out["description"] = self.description
        return out


def integer(name: str, low: int, high: int, *, required: bool = False, description: str | None = None) -> Query:
    """An integer parameter read by ``api/errors.py::int_param(name, low, high)``."""
    return Query(name, {"type": "integer", "minimum": low, "maximum": high}, required, description)


def boolean(name: str, description: str | None = None) -> Query:
    return Query(name, {"type": "boolean"}, description=description)


@dataclass(frozen=True)
class Body:
    """A request body: a model (JSON) or a schema per media type."""

    content: Mapping[str, Any]
    required: bool = True
    description: str | None = None


def json_request(model: Any, *, required: bool = True, description: str | None = None) -> Body:
    return Body({"application/json": model}, required, description)


UPLOAD = Body({"multipart/form-data": {
    "type": "object", "required": ["file"],
    "properties": {"file": {**BINARY, "description": "the file (any part with a filename is taken)"}},
}}, description="one file part (named file; a part with a filename)")
RAW = Body({"application/octet-stream": BINARY}, description="the output's bytes")


@dataclass(frozen=True)
class Reply:
    """One answer of an operation: status, media types (a model or a schema each), headers."""

    status: int
    description: str
    content: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def ok(model: Any, description: str = "OK") -> Reply:
    return Reply(200, description, {"application/json": model})


def created(model: Any, *, unchanged: str | None = None) -> tuple[Reply, ...]:
    """201 with the created thing; ``unchanged``: also 200 when nothing was created (an
    idempotent repeat), described so."""
    replies = (Reply(201, "Created", {"application/json": model}),)
    return replies + ((Reply(200, unchanged, {"application/json": model}),) if unchanged else ())


_LENGTH = {"Content-Length": {"schema": {"type": "integer", "minimum": 0}}}
_DOWNLOAD_HEADERS = {
    **_LENGTH,
    "Accept-Ranges": {"schema": {"type": "string"}, "description": "bytes"},
    "ETag": {"schema": {"type": "string"}},
    "Last-Modified": {"schema": {"type": "string"}},
}
RANGE = {"name": "Range", "in": "header", "required": False,
         "description": "one byte range (bytes=first-last, bytes=first-, bytes=-suffix): answered 206",
         "schema": {"type": "string", "pattern": r"^bytes=([0-9]{1,15}-[0-9]{0,15}|-[0-9]{1,15})$"}}


def download(media_type: str = "application/octet-stream", *, ranges: bool = True, head: bool = False,
             description: str = "The bytes") -> tuple[Reply, ...]:
    """A file answer (aiohttp's ``FileResponse``): 200, or with ``Range`` 206/416, and the
    conditional answers 304/412 (``If-None-Match``, ``If-Match``, ``If-Modified-Since``...)."""
    body = {} if head else {media_type: BINARY}
    replies = [Reply(200, description if not head else "Its size and type (no body)", body, _DOWNLOAD_HEADERS)]
    if ranges:
        replies += [
            Reply(206, "The requested range", body, {**_DOWNLOAD_HEADERS, "Content-Range": {"schema": {"type": "string"}}}),
            Reply(416, "The range is outside the data (Content-Range: bytes */size)",
                  headers={"Content-Range": {"schema": {"type": "string"}}}),
        ]
    replies += [Reply(304, "Not modified (If-None-Match, If-Modified-Since)"),
                Reply(412, "A precondition failed (If-Match, If-Unmodified-Since)")]
    return tuple(replies)


TEXT = (Reply(200, "The text", {"text/plain": TEXT_BODY}),)


SSE_EVENT = {
    "type": "object", "description": "one Server-Sent Event (comment lines keep the stream alive)",
    "properties": {
        "id": {"type": "string", "description": "the stream sequence (Last-Event-ID resumes after it)"},
        "event": {"type": "string", "description": "the event's type"},
        "data": {"type": "string", "contentMediaType": "application/cloudevents+json",
                 "description": "the event as a CloudEvent"},
        "retry": {"type": "integer"},
    },
}


def event_stream(json_alternative: Any = None) -> tuple[Reply, ...]:
    """Server-Sent Events (``id:`` the stream sequence, ``event:`` the type, ``data:`` a
    CloudEvent); with ``json_alternative``, answered instead unless ``Accept`` asks for the stream."""
    content: dict[str, Any] = {"text/event-stream": SSE_EVENT}
    if json_alternative is not None:
        content = {"application/json": json_alternative, **content}
    return (Reply(200, "The events", content),)


def static(*media_types: str) -> tuple[Reply, ...]:
    """A static file of the web view or the API's documentation page."""
    return (Reply(200, "The file", {m: TEXT_BODY for m in media_types}),)


def redirect(status: int = 308) -> tuple[Reply, ...]:
    return (Reply(status, "Redirected", headers={"Location": {"schema": {"type": "string"}}}),)


ANY_JSON_OBJECT = {"type": "object"}

ERROR_DESCRIPTIONS = {
    400: "Malformed request (what was wrong is in detail)",
    401: "Missing credential",
    403: "Wrong credential, a foreign Host or Origin, or a body that is not JSON",
    404: "Not found",
    408: "The body arrived slower than --body-min-rate",
    409: "The state does not allow it",
    413: "The body is too large",
    416: "Range not satisfiable",
    503: "The data store is read-only",
    507: "The data store is full",
}


def _schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    if isinstance(tp, Mapping):  # a JSON schema as it is
        return dict(tp)
    schema = TypeAdapter(tp).json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        components[tp.__name__] = schema
        return {"$ref": REF.format(model=tp.__name__)}
    return schema


def _replies(response: Any) -> tuple[Reply, ...]:
    if response is None:  # a route that does not describe its answer
        return (Reply(200, "OK"),)
    if isinstance(response, Reply):
        return (response,)
    if isinstance(response, tuple) and all(isinstance(r, Reply) for r in response):
        return response
    return (ok(response),)


def _body(body: Any) -> Body | None:
    if body is None or isinstance(body, Body):
        return body
    if body == "multipart/form-data":
        return UPLOAD
    if body == "application/octet-stream":
        return RAW
    if isinstance(body, str):
        return Body({body: ANY_JSON_OBJECT if body == "application/json" else {}})
    return json_request(body)


def _query(q: Any) -> Query:
    if isinstance(q, Query):
        return q
    name, kind = q
    return Query(name, {"type": kind})


def _path_overrides() -> dict[str, dict[str, tuple[dict[str, Any], str]]]:
    from . import ui

    return {"/ui/{name}": {"name": ({"type": "string", "enum": ui.FILE_NAMES}, "a file of the web view")},
            "/ui/vendor/{name}": {"name": ({"type": "string", "enum": ui.VENDOR_NAMES}, "a vendored file")}}


def operation_ids(routes: list[Any]) -> list[str]:
    """The handler's name, unless several routes share a handler: then method and path."""
    names = [r.handler.__name__ for r in routes]
    return [name if names.count(name) == 1 else
            "_".join([r.method.lower(), *re.findall(r"[a-z0-9]+", r.path.replace("{", "by_").lower())])
            for name, r in zip(names, routes)]


def operation(r: Any, components: dict[str, Any], error_ref: dict[str, Any], operation_id: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": r.summary, "operationId": operation_id or r.handler.__name__}
    path_names = re.findall(r"{(\w+)}", r.path)
    params: list[dict[str, Any]] = []
    overrides = _path_overrides().get(r.path, {})
    for n in path_names:
        schema, description = overrides.get(n) or PATH_PARAMETERS.get(n, ({"type": "string"}, ""))
        params.append({"name": n, "in": "path", "required": True, "schema": dict(schema),
                       **({"description": description} if description else {})})
    queries = [_query(q) for q in r.query]
    params += [q.parameter() for q in queries]
    replies = _replies(r.response)
    if any(reply.status == 206 for reply in replies):
        params.append(dict(RANGE))
    if params:
        op["parameters"] = params
    access = str(r.access)
    if access == "public":
        op["security"] = []
    elif access == "step":
        op["security"] = [{"stepCredential": []}]
    body = _body(r.body)
    if body is not None:
        op["requestBody"] = {"required": body.required, "content": {
            media: {"schema": _schema(schema, components)} for media, schema in body.content.items()}}
        if body.description:
            op["requestBody"]["description"] = body.description
    responses: dict[str, Any] = {}
    for reply in replies:
        answer: dict[str, Any] = {"description": reply.description}
        if reply.content:
            answer["content"] = {media: {"schema": _schema(schema, components)} for media, schema in reply.content.items()}
        if reply.headers:
            answer["headers"] = {name: dict(h) for name, h in reply.headers.items()}
        responses[str(reply.status)] = answer
    errors = set(r.errors)
    if access != "public":
        errors |= {401, 403}
    if body is not None:
        errors |= {400, 408, 413}
        if any(media != "application/json" for media in body.content):  # streamed into the blob store
            errors |= set(STORAGE)
    if queries or PATH_VALIDATED & set(path_names):
        errors.add(400)
    for code in sorted(errors - {int(s) for s in responses}):
        responses[str(code)] = {"description": ERROR_DESCRIPTIONS.get(code, "Error"),
                                "content": {"application/json": {"schema": error_ref}}}
    op["responses"] = dict(sorted(responses.items()))
    return op


def document(routes: Iterable[Any]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    error_ref = _schema(ErrorBody, components)
    paths: dict[str, Any] = {}
    routes = list(routes)
    for r, operation_id in zip(routes, operation_ids(routes)):
        paths.setdefault(r.path, {})[r.method.lower()] = operation(r, components, error_ref, operation_id)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Mlynar Events", "version": "1",
                 "description": "The REST API of Mlynar Events (a drop-in for Mlynar's). Swagger UI: /api."},
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items())), "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "the API token (--api-token-file)"},
            "stepCredential": {"type": "http", "scheme": "bearer",
                               "description": "a running Kubernetes step's own credential (its Job's Secret)"},
        }},
        "security": [{"bearer": []}],
    }
