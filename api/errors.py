"""Every error leaves as ``{"error": ..., "detail": ...}`` with a 4xx status (docs/ARCHITECTURE.md, "Error rules").

Command errors from the core carry their status; aiohttp's own HTTP errors keep theirs; anything
unexpected is logged with the request and answered 500 without internals (that is a bug to fix,
never a way to report bad input)."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from mlynar_events.errors import CommandError
from mlynar_events.specs import SpecError, validation_detail

log = logging.getLogger("mlynar.api")


def error(status: int, message: str, detail: Any = None) -> web.Response:
    return web.json_response({"error": message, "detail": detail}, status=status)


class BadRequest(CommandError):
    status = 400


@web.middleware
async def errors_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        return await handler(request)
    except CommandError as exc:
        return error(exc.status, exc.message, exc.detail)
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
        return error(exc.status, exc.reason, None)
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return error(500, "internal error", None)


async def json_body(request: web.Request, *, required: bool = True) -> Any:
    """The request's JSON, with 413/400 that say what was wrong."""
    from .context import ctx

    limit = ctx(request).settings.max_json_bytes
    if request.content_length is not None and request.content_length > limit:
        raise CommandTooLarge(limit)
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise CommandTooLarge(limit)
    if not raw.strip():
        if required:
            raise BadRequest("a JSON body is required")
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest("malformed JSON", str(exc)) from None


class CommandTooLarge(CommandError):
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes", {"maxBytes": limit})
