"""A lease on NATS: at most one replica of a role holds it, and a dead holder's lease runs out.

Why a KV key and not a consumer: a lease must say *who* acts, and hand over when the holder dies
without anyone deciding it. The key lives in the bucket :data:`LEASES_BUCKET`, whose ``max_age``
is the lease's ``ttl``, so the server removes the key ``ttl`` after its last write:

* **acquire**: ``create`` the key (it succeeds only where the key is absent: never held, given
  back, or run out); otherwise try again every ``ttl / 3``;
* **keep**: ``update`` it every ``ttl / 3`` against the revision it last wrote. Another writer's
  revision means the lease went to someone else (lost at once); no successful renewal for
  ``ttl / 2`` (NATS unreachable) means it is given up before the key can run out, so two holders
  never act at once while clocks run at the same rate;
* **release**: delete it (a graceful stop), so a standby takes over without waiting for ``ttl``.

A holder that is SIGKILLed is replaced ``ttl`` after its last renewal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger("mlynar.lease")

LEASES_BUCKET = "mlynar-leases"


async def leases_bucket(js: JetStreamContext, ttl: float, replicas: int = 1) -> KeyValue:
    """The leases' bucket, its ``max_age`` set to ``ttl`` (changed in place when the operator
    changed ``ttl``: every holder of the bucket should be given the same one)."""
    try:
        kv = await js.key_value(LEASES_BUCKET)
    except BucketNotFoundError:
        with contextlib.suppress(BadRequestError):  # created meanwhile by another replica
            return await js.create_key_value(bucket=LEASES_BUCKET, history=1, ttl=ttl, replicas=replicas,
                                             description="leases: which replica of a role acts")
        kv = await js.key_value(LEASES_BUCKET)
    info = await js.stream_info(f"KV_{LEASES_BUCKET}")
    if info.config.max_age is None or abs(info.config.max_age - ttl) > 1e-3:
        config: js_api.StreamConfig = info.config
        config.max_age = ttl
        config.duplicate_window = min(config.duplicate_window or ttl, ttl)
        await js.update_stream(config)
    return kv


@dataclass
class Lease:
    """The lease ``name`` held as ``holder`` (unique per process)."""

    kv: KeyValue
    name: str
    holder: str
    ttl: float
    revision: int | None = field(default=None, init=False)

    async def acquire(self) -> None:
        """Until this process holds the lease."""
        while True:
            try:
                self.revision = await self.kv.create(self.name, self.holder.encode())
                log.info("lease acquired", extra={"lease": self.name, "holder": self.holder})
                return
            except KeyWrongLastSequenceError:
                pass  # held by another replica
            except (NatsError, OSError, asyncio.TimeoutError) as exc:
                log.warning("cannot try the lease yet", extra={"lease": self.name, "error": repr(exc)})
            await asyncio.sleep(self.ttl / 3)

    async def keep(self) -> None:
        """Renew the lease; returns when it is lost (then this process must stop acting)."""
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                self.revision = await asyncio.wait_for(
                    self.kv.update(self.name, self.holder.encode(), last=self.revision), self.ttl / 6)
                renewed = loop.time()
            except KeyWrongLastSequenceError:
                log.warning("lease taken by another replica", extra={"lease": self.name, "holder": self.holder})
                self.revision = None
                return
            except (NatsError, OSError, asyncio.TimeoutError) as exc:
                if loop.time() - renewed >= self.ttl / 2:
                    log.warning("lease given up: it could not be renewed",
                                extra={"lease": self.name, "holder": self.holder, "error": repr(exc)})
                    self.revision = None
                    return

    async def release(self) -> None:
        """Give the lease back now (only if still ours); a failure leaves it to run out."""
        if self.revision is None:
            return
        revision, self.revision = self.revision, None
        with contextlib.suppress(Exception):
            await self.kv.delete(self.name, last=revision)
            log.info("lease released", extra={"lease": self.name, "holder": self.holder})
