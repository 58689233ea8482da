"""What the handlers share, reachable through one ``AppKey`` (aiohttp's typed app state)."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiosqlite
from aiohttp import web

from mlynar_events.blobs import BlobStore
from mlynar_events.config import ApiSettings
from mlynar_events.runstate import RunStateCache
from mlynar_events.secrets import SecretStore
from mlynar_events.store import EventStore
from projections.projector import Projector


@dataclass
class ApiContext:
    """The API role's parts and its settings group; ``api_token`` is the value read from
    ``settings.api_token_file`` at start."""

    store: EventStore
    blobs: BlobStore
    secrets: SecretStore
    db: aiosqlite.Connection
    projector: Projector
    settings: ApiSettings
    api_token: str | None = None
    read_timeout: float = 10.0
    runs: RunStateCache = field(init=False)

    def __post_init__(self) -> None:
        self.runs = RunStateCache(self.store)

    async def caught_up(self, seq: int | None) -> None:
        """Read-your-writes: return once the views include ``seq``."""
        if seq is not None and not await self.projector.wait_for(seq, self.read_timeout):
            raise web.HTTPServiceUnavailable(reason="projection lagging")


CTX: web.AppKey[ApiContext] = web.AppKey("ctx", ApiContext)


def ctx(request: web.Request) -> ApiContext:
    return request.app[CTX]
