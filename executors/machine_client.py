"""The executor's async client for the machine-agent protocol (``/v1``, see
:mod:`executors.agent`).

Every failure raises :class:`AgentError`, whose message names the agent URL and what happened
(connection refused, timeout, HTTP status with the agent's ``{"error", "detail"}``), and whose
``status`` is the HTTP status (``None`` when no response arrived). Uploads and downloads are
streamed from and to disk; nothing holds a whole file in memory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

DOWNLOAD_CHUNK = 1024**2


class AgentError(Exception):
    """A request to a machine agent failed."""

    def __init__(
        self, message: str, status: int | None = None, *, error: str | None = None, detail: Any = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error = error  # the agent's "error" field, when it answered with one
        self.detail = detail

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Download:
    path: Path
    size: int
    sha256: str


class AgentClient:
    """Talks to one agent at ``url`` (e.g. ``http://10.0.0.5:5555``, without ``/v1``).

    ``connect_timeout`` bounds establishing a connection, ``read_timeout`` any single wait for
    bytes from the agent (a long-poll adds its ``wait`` on top)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._token = token
        self._own_session = session is None
        self._session = session

    # -- plumbing --

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                version=aiohttp.HttpVersion11,
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_read=self.read_timeout),
                raise_for_status=False,
            )
            self._own_session = True
        return self._session

    def _timeout(self, extra_read: float = 0.0) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, connect=self.connect_timeout, sock_connect=self.connect_timeout,
            sock_read=self.read_timeout + extra_read,
        )

    @staticmethod
    def _step_path(step_id: str, suffix: str = "") -> str:
        return f"/v1/steps/{quote(step_id, safe='')}{suffix}"

    async def _raise_for(self, method: str, path: str, resp: aiohttp.ClientResponse) -> None:
        if 300 <= resp.status < 400:
            # Redirects are never followed: the agent's URL is the one the machine was registered
            # with, and following one would make the service fetch (and store) any address.
            raise AgentError(f"agent {self.url}: {method} {path}: answered a redirect ({resp.status}), "
                             "which is not followed", resp.status)
        if resp.status < 400:
            return
        error: str | None = None
        detail: Any = None
        try:
            body = await resp.read()
            parsed = json.loads(body)
            if isinstance(parsed, dict):
                error = parsed.get("error")
                detail = parsed.get("detail")
            text = body.decode("utf-8", "replace")
        except (ValueError, aiohttp.ClientError, asyncio.TimeoutError):
            text = ""
        if error is not None:
            what = f"{error}" + (f" ({json.dumps(detail)})" if detail is not None else "")
        else:
            what = (text[:300] or resp.reason or "no body").strip()
        raise AgentError(
            f"agent {self.url}: {method} {path} -> HTTP {resp.status}: {what}",
            resp.status, error=error, detail=detail,
        )

    def _wrap(self, method: str, path: str, e: BaseException, timeout: float | None = None) -> AgentError:
        where = f"agent {self.url}: {method} {path}"
        if isinstance(e, aiohttp.ClientConnectorError):
            return AgentError(f"{where}: cannot connect ({e.os_error.strerror or e.os_error})"
                              if e.os_error is not None else f"{where}: cannot connect ({e})")
        if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            t = f" after {timeout:g} s" if timeout else ""
            return AgentError(f"{where}: timed out{t} waiting for the agent")
        if isinstance(e, aiohttp.ServerDisconnectedError):
            return AgentError(f"{where}: the agent closed the connection")
        return AgentError(f"{where}: {type(e).__name__}: {e}")

    async def _json(self, method: str, path: str, *, params: dict | None = None, extra_read: float = 0.0,
                    data: Any = None) -> dict:
        session = self._get_session()
        try:
            async with session.request(
                method, self.url + path, params=params, data=data, headers=self._headers(),
                timeout=self._timeout(extra_read), allow_redirects=False,
            ) as resp:
                await self._raise_for(method, path, resp)
                try:
                    return await resp.json(content_type=None)
                except ValueError as e:
                    raise AgentError(f"agent {self.url}: {method} {path}: answer is not JSON ({e})", resp.status) from e
        except AgentError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise self._wrap(method, path, e, self.read_timeout + extra_read) from e

    # -- API --

    async def health(self) -> dict:
        """``GET /v1/healthz``."""
        return await self._json("GET", "/v1/healthz")

    async def put_step(self, step_id: str, manifest: dict, inputs: dict[str, Path]) -> dict:
        """``PUT /v1/steps/{step_id}``: the manifest, then each input file (streamed from disk) as
        the part named by its input name. Returns the status (HTTP 202 new, 200 re-attached)."""
        path = self._step_path(step_id)
        with ExitStack() as stack:
            mp = aiohttp.MultipartWriter("form-data")
            part = mp.append(json.dumps(manifest), {"Content-Type": "application/json"})
            part.set_content_disposition("form-data", name="manifest")
            for name, file_path in inputs.items():
                f = stack.enter_context(open(file_path, "rb"))
                part = mp.append(f, {"Content-Type": "application/octet-stream"})
                part.set_content_disposition("form-data", name=name, filename=Path(file_path).name)
            return await self._json("PUT", path, data=mp)

    async def status(self, step_id: str, wait: float | None = None) -> dict:
        """``GET /v1/steps/{step_id}``; with ``wait`` (0 < wait <= 60) long-polls until the step is
        terminal or ``wait`` seconds pass."""
        params = {"wait": f"{wait:g}"} if wait is not None else None
        return await self._json("GET", self._step_path(step_id), params=params, extra_read=wait or 0.0)

    async def delete_step(self, step_id: str) -> dict:
        """``DELETE /v1/steps/{step_id}``: cancels the step if it runs and removes its sandbox."""
        return await self._json("DELETE", self._step_path(step_id))

    async def download_output(self, step_id: str, n: int, dest: Path, *, expected_sha256: str | None = None) -> Download:
        """Stream output ``n`` into ``dest`` (written atomically). With ``expected_sha256`` a
        mismatch raises :class:`AgentError` and leaves ``dest`` untouched."""
        return await self._download(self._step_path(step_id, f"/outputs/{int(n)}"), Path(dest), expected_sha256)

    async def download_logs(self, step_id: str, dest: Path) -> Download:
        """Stream the step's ``logs.txt`` (so far, if it still runs) into ``dest``."""
        return await self._download(self._step_path(step_id, "/logs"), Path(dest), None)

    async def _download(self, path: str, dest: Path, expected_sha256: str | None) -> Download:
        session = self._get_session()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    async with session.get(self.url + path, headers=self._headers(), timeout=self._timeout(),
                                           allow_redirects=False) as resp:
                        await self._raise_for("GET", path, resp)
                        async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            await asyncio.to_thread(out.write, chunk)
                except AgentError:
                    raise
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    raise self._wrap("GET", path, e, self.read_timeout) from e
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256.lower():
                raise AgentError(
                    f"agent {self.url}: GET {path}: sha256 mismatch (expected {expected_sha256}, got {sha}, {size} bytes)"
                )
            os.replace(tmp, dest)
            return Download(path=dest, size=size, sha256=sha)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def close(self) -> None:
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()

    async def __aenter__(self) -> "AgentClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
