"""Every error leaves as ``{"error": ..., "detail": ...}`` with a 4xx status (docs/ARCHITECTURE.md, "Error rules").

Command errors from the core carry their status; aiohttp's own HTTP errors keep theirs; anything
unexpected is logged with the request and answered 500 without internals (that is a bug to fix,
never a way to report bad input)."""

from __future__ import annotations

import errno
import json
import logging
import re
from typing import Any

from aiohttp import hdrs, web
from pydantic import ValidationError

from mlynar_events.errors import CommandError
from mlynar_events.specs import SpecError, validation_detail

from .models import ErrorBody

log = logging.getLogger("mlynar.api")


def error(status: int, message: str, detail: Any = None) -> web.Response:
    """The one error body: ours (``error``, ``detail``) and the original Mlynar's (NestJS:
    ``statusCode``, ``message``), so clients of either read it."""
    return web.json_response(ErrorBody(error=message, detail=detail, statusCode=status, message=message)
                             .model_dump(mode="json"), status=status)


class BadRequest(CommandError):
    status = 400


STORAGE_ERRORS: dict[int, tuple[int, str]] = {
    errno.ENOSPC: (507, "no space left to store the data"),
    errno.EDQUOT: (507, "the data store's quota is exhausted"),
    errno.EROFS: (503, "the data store is read-only"),
}
"""Disk errors while storing a request's data, answered as what they are (not a 500)."""


@web.middleware
async def errors_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        return await handler(request)
    except CommandError as exc:
        response = error(exc.status, exc.message, exc.detail)
        if exc.status == 408:  # the client is too slow to wait for the rest of its body
            response.force_close()
        return response
    except SpecError as exc:
        return error(400, str(exc), exc.detail)
    except ValidationError as exc:
        return error(400, "invalid request body", validation_detail(exc))
    except web.HTTPRequestEntityTooLarge as exc:
        return error(413, "request body too large", {"maxBytes": exc.max_size if hasattr(exc, "max_size") else None})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json":
            raise
        response = error(exc.status, exc.reason, None)
        if hdrs.ALLOW in exc.headers:  # a 405 says which methods the resource has (RFC 9110)
            response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        return response
    except ConnectionError:
        if request.transport is not None and not request.transport.is_closing():
            log.exception("unhandled error", extra={"method": request.method, "path": request.path})
            return error(500, "internal error", None)
        # the client went away mid-request (aiohttp raises ConnectionResetError from its body
        # reads): not our error. The answer goes nowhere; aiohttp drops it and the connection
        # quietly (re-raising would make aiohttp log a 500 with a traceback)
        log.info("client disconnected", extra={"method": request.method, "path": request.path})
        return error(400, "the client disconnected before its request was complete", None)
    except OSError as exc:
        answer = STORAGE_ERRORS.get(exc.errno or 0)
        if answer is None:
            log.exception("unhandled error", extra={"method": request.method, "path": request.path})
            return error(500, "internal error", None)
        # the disk the data goes to, not the request: said as such; nothing was recorded (the
        # partial file is removed and no event points at it)
        log.error("storage refused a write: %s", exc.strerror, extra={"method": request.method, "path": request.path})
        return error(answer[0], answer[1], {"errno": errno.errorcode.get(exc.errno or 0), "reason": exc.strerror})
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return error(500, "internal error", None)


_INTEGER = re.compile(r"^[+-]?[0-9]{1,19}$")
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a JSON body may have (Mlynar's documents need about 6)."""


def _is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or (content_type.startswith("application/")
                                                    and content_type.endswith("+json"))


_JSON_TYPES = {type(None): "null", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean"}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 unless ``value`` nests at most ``max_depth`` deep and all its text is encodable
    (a lone surrogate such as ``"\\ud800"`` parses but cannot be stored as UTF-8).
    Iterative, so no input can exhaust the stack here."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                near = item[max(exc.start - 8, 0):exc.end + 8].encode("utf-8", "backslashreplace").decode()
                raise BadRequest("the JSON body contains text that is not valid Unicode (a lone surrogate)",
                                 {"near": near}) from None
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise BadRequest(f"the JSON body is nested deeper than {max_depth} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


async def json_body(request: web.Request, *, required: bool = True) -> Any:
    """The request's JSON, or a 4xx that says what was wrong, before anything is written.

    The one reader of JSON bodies: the whole body up to ``--max-json-bytes`` whatever the
    transfer encoding (413 above it, chunked or not), on the body clock (408 when it trickles);
    a JSON content type when there is a body (403 otherwise: that is what a cross-site page can
    send, see ``api/door.py``); syntax, depth and Unicode checked (400); an object, as every
    route's schema says (400 for ``null``, a list, a number or a string)."""
    from .body import BodyClock
    from .context import ctx

    settings = ctx(request).settings
    limit = settings.max_json_bytes
    if request.content_length is not None and request.content_length > limit:
        raise CommandTooLarge(limit)
    if request.body_exists and not _is_json_type(request.content_type):
        raise Forbidden(f"a JSON body needs Content-Type application/json, not {request.content_type!r}",
                        {"contentType": request.content_type})
    clock = BodyClock(request, settings)
    raw = bytearray()
    async for chunk in clock.chunks(request.content.iter_any()):
        raw += chunk
        if len(raw) > limit:
            raise CommandTooLarge(limit)
    if not raw.strip():
        if required:
            raise BadRequest("a JSON body is required")
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:  # syntax, bad UTF-8, NaN/Infinity, an integer of thousands of digits
        raise BadRequest("malformed JSON", str(exc)) from None
    except RecursionError:
        raise BadRequest(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_json_value(value)
    if not isinstance(value, dict):
        raise BadRequest(f"the JSON body must be an object, not {_JSON_TYPES.get(type(value), 'a value')}")
    return value


def int_param(request: web.Request, name: str, low: int, high: int, default: int | None = None) -> int:
    """Query parameter ``name`` as an integer in ``[low, high]`` (400 otherwise, or when it is
    missing and has no default). The one parser of integer parameters, so none reaches SQLite
    or an event unbounded."""
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"query parameter {name!r} is required")
        return default
    if not _INTEGER.fullmatch(raw):
        raise BadRequest(f"{name} must be an integer, got {raw[:40]!r}")
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


class Forbidden(CommandError):
    status = 403


class CommandTooLarge(CommandError):
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes", {"maxBytes": limit})
