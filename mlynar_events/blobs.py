"""Blob stores hold the bytes of data units and step logs; events only reference them by key.

Writes stream to a temporary file, are fsynced and then renamed into place, so a key either names
complete bytes or nothing. Nothing here holds a whole file in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterable, AsyncIterator, Protocol

import aiofiles
import aiofiles.os

CHUNK = 1024 * 1024
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BlobTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


class BlobNotFound(KeyError):
    pass


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    parts = key.split("/")
    if not parts or any(not _SEGMENT.match(p) or p in {".", ".."} for p in parts):
        raise ValueError(f"invalid blob key {key!r}")
    return key


def unit_key(run_id: str, unit_id: str) -> str:
    return f"runs/{run_id}/units/{unit_id}"


def logs_key(run_id: str, step_id: str, attempt: int) -> str:
    return f"runs/{run_id}/logs/{step_id}-{attempt}.txt"


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}"


class BlobStore(Protocol):
    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], max_bytes: int | None = None) -> BlobInfo: ...
    async def put_file(self, key: str, source: Path) -> BlobInfo: ...
    async def read(self, key: str) -> AsyncIterator[bytes]: ...
    async def get_to_file(self, key: str, dest: Path) -> None: ...
    def local_path(self, key: str) -> Path | None: ...
    async def exists(self, key: str) -> bool: ...
    async def delete_prefix(self, prefix: str) -> None: ...


class FileBlobStore:
    """Blobs as files under one directory (a shared RWX volume when roles run apart)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], max_bytes: int | None = None) -> BlobInfo:
        dest = self._path(key)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        digest, size = hashlib.sha256(), 0
        try:
            async with aiofiles.open(tmp, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise BlobTooLarge(max_bytes)
                    digest.update(chunk)
                    await f.write(chunk)
                await f.flush()
                os.fsync(f.fileno())
            for attempt in range(3):  # a concurrent delete may prune the fresh directory (_prune)
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    await aiofiles.os.replace(tmp, dest)
                    break
                except FileNotFoundError:
                    if attempt == 2 or not tmp.exists():
                        raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return BlobInfo(key, size, digest.hexdigest())

    async def put_file(self, key: str, source: Path) -> BlobInfo:
        async def chunks() -> AsyncIterator[bytes]:
            async with aiofiles.open(source, "rb") as f:
                while chunk := await f.read(CHUNK):
                    yield chunk

        return await self.put_stream(key, chunks())

    async def read(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        async with aiofiles.open(path, "rb") as f:
            while chunk := await f.read(CHUNK):
                yield chunk

    async def get_to_file(self, key: str, dest: Path) -> None:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)  # same filesystem: free; blobs are immutable
        except OSError:
            await _copy(path, dest)

    async def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            import asyncio

            await asyncio.to_thread(shutil.rmtree, path, True)
        elif path.is_file():
            path.unlink(missing_ok=True)
        self._prune(path.parent)

    def _prune(self, directory: Path) -> None:
        """Remove ``directory`` and its parents up to the root while they are empty, so a write
        that lost a race with a delete (an upload into a run being deleted) leaves no empty
        directories behind. A writer that lost its fresh directory this way retries (put_stream)."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop here
                if directory.exists():
                    return
            directory = directory.parent


async def _copy(src: Path, dest: Path) -> None:
    async with aiofiles.open(src, "rb") as fin, aiofiles.open(dest, "wb") as fout:
        while chunk := await fin.read(CHUNK):
            await fout.write(chunk)
