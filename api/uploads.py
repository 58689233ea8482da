"""Reading uploaded files: the one file part of a multipart body, and the name it may be stored
under."""

from __future__ import annotations

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .errors import BadRequest


async def first_file_part(request: web.Request) -> BodyPartReader:
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("expected a multipart/form-data body with one file part")
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                raise BadRequest("the multipart body has no file part")
            if isinstance(part, BodyPartReader) and part.filename is not None:
                return part
            if isinstance(part, BodyPartReader):
                await part.release()
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        raise BadRequest("malformed multipart body", str(exc)) from None


def safe_filename(name: str | None) -> str:
    base = (name or "data").replace("\\", "/").rsplit("/", 1)[-1].strip()
    cleaned = "".join(ch for ch in base if ch.isalnum() or ch in "._-")[:128].lstrip(".")
    return cleaned or "data"
