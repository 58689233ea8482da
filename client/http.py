"""How the CLI reaches the service: where (``--api`` / ``MLYNAR_API``), with which token
(``MLYNAR_TOKEN``, or ``--token-file`` / ``MLYNAR_TOKEN_FILE``), and what a refusal becomes (one
line with the API's own ``{"error", "detail"}`` message and an exit code, never a traceback).

The exit codes are the CLI's contract with scripts (the README's "CLI" section lists them):

=====  ==========================================================================
code   meaning
=====  ==========================================================================
0      done; a watched run ended with every step succeeded
1      a watched run ended with at least one failed step
2      usage: bad arguments, a local file that cannot be read, an invalid document
3      a watched run was terminated (or deleted) before it completed
4      the API refused the request (400, 404, 409, 413: the message says why)
5      authentication: no token, a wrong token (401/403)
6      the service cannot be reached, or answered something that is not the API's
130    Ctrl-C: stopped watching (the run itself goes on)
=====  ==========================================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
from pydantic import BaseModel, Field

OK, STEP_FAILED, USAGE, TERMINATED, REFUSED, AUTH, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 4, 5, 6, 130

TOKEN_VARIABLE = "MLYNAR_TOKEN"
"""The token itself is a variable only (used when no token file is given): as a flag it would be
visible to every user in ``ps``."""


class ClientSettings(BaseModel):
    """Where the CLI's commands go. Each field is a flag and its ``MLYNAR_*`` variable
    (``--api`` <-> ``MLYNAR_API``), declared by :func:`mlynar_events.config.add_model_flags` like
    the service's own settings, so the two can never drift."""

    api: str = Field("http://127.0.0.1:3000", description="base URL of the Mlynar Events REST API")
    token_file: Path | None = Field(None, description="file holding the API's bearer token (without one: MLYNAR_TOKEN)")

    def token(self) -> str | None:
        """The token file's (``--token-file`` or ``MLYNAR_TOKEN_FILE``), else ``MLYNAR_TOKEN``'s
        (what a CI job sets from its secret store), else none."""
        if self.token_file is None:
            return os.environ.get(TOKEN_VARIABLE, "").strip() or None
        try:
            return self.token_file.read_text().strip() or None
        except OSError as exc:
            raise CliError(f"cannot read the token file {self.token_file}: {exc.strerror}", USAGE) from None


class CliError(Exception):
    """What ends a command with one line on stderr and an exit code (see the module's table)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class ApiError(CliError):
    """The API answered 4xx/5xx; ``message`` is its ``error`` (and a short form of ``detail``)."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        code = AUTH if status in (401, 403) else REFUSED if 400 <= status < 500 else UNREACHABLE
        text = error + (f": {short_detail(detail)}" if short_detail(detail) else "")
        super().__init__(f"{text} (HTTP {status})", code)
        self.status, self.error, self.detail = status, error, detail


def short_detail(detail: Any, limit: int = 300) -> str:
    """An error's ``detail`` on one line: strings as they are, lists joined, pydantic-style
    ``{"loc", "msg"}`` items as ``loc: msg``; the rest as compact JSON."""
    if detail is None or detail == {} or detail == []:
        return ""
    if isinstance(detail, str):
        text = detail
    elif isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(x) for x in item.get("loc", []))
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(item if isinstance(item, str) else json.dumps(item))
        text = "; ".join(parts)
    else:
        text = json.dumps(detail, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def _raise_for(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    body: Any = None
    with contextlib.suppress(Exception):
        body = json.loads(await resp.text())
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        raise ApiError(resp.status, body["error"], body.get("detail"))
    raise ApiError(resp.status, f"{resp.reason or 'error'} from {resp.url.origin()} (not an answer of the Mlynar API?)")


class Api:
    """One session with the service. Paths are the API's (``/api/run/…``), joined to ``--api``
    as text so a service behind a path prefix (``https://host/mlynar``) works too."""

    def __init__(self, settings: ClientSettings) -> None:
        self.base = settings.api.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise CliError(f"--api must be an http(s):// URL, got {settings.api!r}", USAGE)
        token = settings.token()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Api":
        # no total timeout: uploads may be large and event streams last as long as the run;
        # connecting and each read have their own bounds
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self._session = aiohttp.ClientSession(headers=self.headers, timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Api as an async context manager"
        return self._session

    def url(self, path: str) -> str:
        return self.base + path

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response of a call that succeeded (2xx/3xx); any refusal is an :class:`ApiError`
        and an unreachable service a :class:`CliError` with :data:`UNREACHABLE`."""
        try:
            async with self.session.request(method, self.url(path), **kwargs) as resp:
                await _raise_for(resp)
                yield resp
        except aiohttp.ClientConnectorError as exc:
            raise CliError(f"cannot reach the API at {self.base}: {exc.os_error.strerror or exc}", UNREACHABLE) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise CliError(f"the connection to {self.base} broke: {exc}", UNREACHABLE) from None
        except TimeoutError:
            raise CliError(f"the API at {self.base} did not answer in time", UNREACHABLE) from None
        except aiohttp.InvalidURL:
            raise CliError(f"--api {self.base!r} is not a valid URL", USAGE) from None

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.request(method, path, **kwargs) as resp:
            try:
                return json.loads(await resp.text())
            except ValueError:
                raise CliError(f"{method} {path}: the answer is not JSON (is {self.base} a Mlynar API?)",
                               UNREACHABLE) from None

    async def get(self, path: str, **params: Any) -> Any:
        return await self.json("GET", path, params={k: v for k, v in params.items() if v is not None} or None)

    async def text(self, path: str) -> str:
        async with self.request("GET", path) as resp:
            return await resp.text(errors="replace")

    async def upload(self, path: str, file: Path) -> Any:
        """A multipart upload of ``file`` streamed from disk (never read whole into memory)."""
        with file.open("rb") as f:
            form = aiohttp.FormData()
            form.add_field("file", f, filename=file.name, content_type="application/octet-stream")
            return await self.json("POST", path, data=form)

    async def download(self, path: str, dest: Path, sha256: str | None = None) -> int:
        """Stream ``path`` into ``dest`` (via a temporary file beside it, renamed when complete
        and matching ``sha256``), answering the byte count."""
        tmp = dest.with_name(dest.name + ".part")
        digest, size = hashlib.sha256(), 0
        try:
            async with self.request("GET", path) as resp:
                with tmp.open("wb") as out:
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            if sha256 and digest.hexdigest() != sha256:
                raise CliError(f"{dest}: the downloaded bytes do not match the unit's sha256", UNREACHABLE)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return size
