"""A thin layer over kubernetes_asyncio: JSON dicts in and out, errors that name the call and the
HTTP status, bounded retries of transient failures, and list+watch with resourceVersion resume.

Objects are handled as the API's own JSON (``dict``) rather than generated model classes, so Jobs,
Pods and custom resources go through the same code and what we read is exactly what
``kubectl get -o json`` shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from mlynar_events.config import KubeSettings

log = logging.getLogger("mlynar.kubernetes")

CALL_TRIES = 3
WATCH_SECONDS = 300  # server-side timeout of one watch request; we reconnect from the last rv
WATCH_FAILURES = 6  # consecutive failed (re)connections before giving up


class KubeError(Exception):
    """A call to the Kubernetes API failed. ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, what: str, status: int | None, reason: str, message: str = "") -> None:
        self.what, self.status, self.reason, self.message = what, status, reason, message
        answer = f"{status} {reason}" if status else reason
        super().__init__(f"kubernetes API {what}: {answer}" + (f": {message}" if message else ""))

    @property
    def transient(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


async def new_api_client(settings: KubeSettings) -> k8s.ApiClient:
    """An API client from the pod's service account (``--kube-in-cluster``) or a kubeconfig."""
    cfg = k8s.Configuration()
    if settings.in_cluster:
        k8s_config.load_incluster_config(client_configuration=cfg)
    elif settings.config is not None:
        await k8s_config.load_kube_config(config_file=str(settings.config), client_configuration=cfg,
                                          persist_config=False)
    else:
        raise ValueError("the Kubernetes API needs --kube-config or --kube-in-cluster")
    return k8s.ApiClient(cfg)


def _message(body: bytes) -> str:
    try:
        status = json.loads(body)
        return str(status.get("message") or "") if isinstance(status, dict) else ""
    except ValueError:
        return body[:200].decode(errors="replace")


def _rv(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


class Kube:
    def __init__(self, api: k8s.ApiClient, namespace: str, *, request_timeout: float = 30.0,
                 retry_base: float = 0.2) -> None:
        self.api = api
        self.namespace = namespace
        self.core = k8s.CoreV1Api(api)
        self.batch = k8s.BatchV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.request_timeout = request_timeout
        self.retry_base = retry_base

    async def close(self) -> None:
        await self.api.close()

    async def _send(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: Any = None,
                    **kwargs: Any) -> aiohttp.ClientResponse:
        try:
            timeout = timeout or aiohttp.ClientTimeout(sock_connect=self.request_timeout, sock_read=self.request_timeout * 2)
            return await fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
        except ApiException as exc:  # raised by the client before sending (e.g. bad config)
            raise KubeError(what, exc.status or None, str(exc.reason)) from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise KubeError(what, None, f"unreachable ({type(exc).__name__}: {exc or 'timeout'})") from None

    async def call(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, tries: int = CALL_TRIES,
                   **kwargs: Any) -> dict[str, Any]:
        """One API call returning its JSON; transient failures (no answer, 429, 5xx) are retried
        ``tries`` times with backoff, other answers raise :class:`KubeError` at once."""
        for n in range(tries):
            try:
                resp = await self._send(what, fn, *args, **kwargs)
                async with resp:
                    body = await resp.read()
                    if 200 <= resp.status < 300:
                        return json.loads(body) if body else {}
                    raise KubeError(what, resp.status, resp.reason or "", _message(body))
            except KubeError as exc:
                if not exc.transient or n == tries - 1:
                    raise
                delay = self.retry_base * 2**n * (0.5 + random.random())
                log.warning("kubernetes API call failed; retrying", extra={"error": str(exc), "retry_in": round(delay, 2)})
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def get(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """Like :meth:`call`, ``None`` on 404."""
        try:
            return await self.call(what, fn, *args, **kwargs)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> bool:
        """Delete; ``False`` if it was already gone."""
        return await self.get(what, fn, *args, **kwargs) is not None

    async def create(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """Create; ``None`` if an object of that name exists already (409 AlreadyExists)."""
        try:
            return await self.call(what, fn, *args, **kwargs)
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise

    async def stream_to_file(self, what: str, fn: Callable[..., Awaitable[Any]], dest: Path, *args: Any,
                             **kwargs: Any) -> None:
        """Stream a non-JSON body (pod logs) into ``dest`` without holding it in memory."""
        resp = await self._send(what, fn, *args, **kwargs)
        async with resp:
            if not 200 <= resp.status < 300:
                raise KubeError(what, resp.status, resp.reason or "", _message(await resp.read()))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    f.write(chunk)

    async def list_and_watch(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any,
                             **kwargs: Any) -> AsyncIterator[tuple[str, Any]]:
        """List, then watch from the list's resourceVersion, forever.

        Yields ``("SYNC", items)`` after every (re)list — the complete current set — then
        ``(type, object)`` for ADDED/MODIFIED/DELETED. A watch that ends (server timeout, dropped
        connection) is resumed from the last resourceVersion seen (bookmarks included); "410 Gone"
        (that version is compacted away) leads to a fresh list. Consecutive failures beyond
        ``WATCH_FAILURES`` and non-transient errors (403, 404, ...) raise :class:`KubeError`."""
        rv: str | None = None
        failures = 0
        while True:
            if rv is None:
                listing = await self.call(f"list {what}", fn, *args, **kwargs)
                rv = _rv(listing) or "0"
                yield "SYNC", listing.get("items") or []
            try:
                resp = await self._send(
                    f"watch {what}", fn, *args, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                    timeout_seconds=WATCH_SECONDS,
                    timeout=aiohttp.ClientTimeout(sock_connect=self.request_timeout, sock_read=WATCH_SECONDS + 30),
                    **kwargs)
                async with resp:
                    if resp.status == 410:
                        rv = None
                        continue
                    if resp.status != 200:
                        raise KubeError(f"watch {what}", resp.status, resp.reason or "", _message(await resp.read()))
                    failures = 0
                    while line := await resp.content.readline():
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                rv = None
                                break
                            raise KubeError(f"watch {what}", obj.get("code"), obj.get("reason", ""), obj.get("message", ""))
                        rv = _rv(obj) or rv
                        if kind in {"ADDED", "MODIFIED", "DELETED"}:
                            yield kind, obj
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                err = KubeError(f"watch {what}", None, f"connection lost ({type(exc).__name__}: {exc})")
                failures = await self._watch_failed(err, failures)
            except KubeError as exc:
                if not exc.transient:
                    raise
                failures = await self._watch_failed(exc, failures)

    async def _watch_failed(self, exc: KubeError, failures: int) -> int:
        failures += 1
        if failures > WATCH_FAILURES:
            raise exc
        delay = min(self.retry_base * 2**failures, 10.0) * (0.5 + random.random())
        log.warning("watch interrupted; resuming", extra={"error": str(exc), "retry_in": round(delay, 2)})
        await asyncio.sleep(delay)
        return failures
