"""Reading uploaded files: the one file part of a multipart body, and the name it may be stored
under. Every read is on the request's body clock (``api/body.py``), and a body counts only when
it reaches its closing boundary."""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .body import BodyClock
from .errors import BadRequest

MULTIPART_ERRORS = (ValueError, AssertionError, RuntimeError, HttpProcessingError)
"""What aiohttp's multipart reader raises on a malformed body (a 400, never a 500)."""
CHUNK = 1024 * 1024


async def first_file_part(request: web.Request, clock: BodyClock) -> tuple[MultipartReader, BodyPartReader]:
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("expected a multipart/form-data body with one file part")
    try:
        reader = await request.multipart()
        while True:
            part = await clock(reader.next())
            if part is None:
                raise BadRequest("the multipart body has no file part")
            if isinstance(part, BodyPartReader) and part.filename is not None:
                return reader, part
            if isinstance(part, BodyPartReader):
                await clock(part.release())
    except MULTIPART_ERRORS as exc:
        raise BadRequest("malformed multipart body", str(exc)) from None


async def file_chunks(reader: MultipartReader, part: BodyPartReader, clock: BodyClock) -> AsyncIterator[bytes]:
    """The file part's bytes, then the rest of the body read up to its closing boundary. A
    body that ends before it raises ValueError while the blob store still holds the bytes in a
    temporary file, which it then drops: a truncated upload is never stored as a unit."""
    while chunk := await clock(part.read_chunk(CHUNK)):
        yield chunk
    await clock(reader.release())
    if not reader.at_eof():
        raise ValueError("the multipart body ends without its closing boundary")


def safe_filename(name: str | None) -> str:
    base = (name or "data").replace("\\", "/").rsplit("/", 1)[-1].strip()
    cleaned = "".join(ch for ch in base if ch.isalnum() or ch in "._-")[:128].lstrip(".")
    return cleaned or "data"
