"""The lease (mlynar_events.lease) against a real nats-server: at most one holder, a graceful
release hands over at once, a holder that stops renewing (SIGKILLed, cut off) is replaced only
after the ttl, and a holder whose lease went to someone else learns it."""

from __future__ import annotations

import asyncio

from mlynar_events.lease import LEASES_BUCKET, Lease, leases_bucket
from mlynar_events.store import EventStore

from support import wait_until

TTL = 1.0


async def _revision(lease: Lease) -> int:
    return (await lease.kv.get(lease.name)).revision


async def test_one_holder_and_a_release_hands_over(store: EventStore) -> None:
    kv = await leases_bucket(store.js, TTL)
    first, second = Lease(kv, "role", "first", TTL), Lease(kv, "role", "second", TTL)
    await first.acquire()
    keeper = asyncio.create_task(first.keep())
    waiting = asyncio.create_task(second.acquire())
    start = await _revision(first)
    # renewed past several ttls while the second keeps trying: it never gets the lease
    await wait_until(lambda: _renewed(first, start + 4), what="the first holder to renew four times")
    assert not waiting.done() and (await kv.get("role")).value == b"first"
    keeper.cancel()
    await first.release()
    await asyncio.wait_for(waiting, 5 * TTL)
    assert (await kv.get("role")).value == b"second"
    await second.release()


async def _renewed(lease: Lease, revision: int) -> bool:
    return await _revision(lease) >= revision


async def test_a_holder_that_stops_renewing_is_replaced_after_the_ttl(store: EventStore) -> None:
    kv = await leases_bucket(store.js, TTL)
    dead, standby = Lease(kv, "role", "dead", TTL), Lease(kv, "role", "standby", TTL)
    loop = asyncio.get_running_loop()
    await dead.acquire()
    acquired_at = loop.time()  # "dead" never renews, as if SIGKILLed right here
    await asyncio.wait_for(standby.acquire(), 10 * TTL)
    assert loop.time() - acquired_at >= TTL * 0.9  # never two holders: not before the key ran out
    assert (await kv.get("role")).value == b"standby"
    # the dead holder, if it wakes up, learns at its next renewal that the lease is gone
    await asyncio.wait_for(dead.keep(), 5 * TTL)
    assert dead.revision is None
    await dead.release()  # a no-op: it must not delete the standby's lease
    assert (await kv.get("role")).value == b"standby"


async def test_the_bucket_follows_a_changed_ttl(store: EventStore) -> None:
    await leases_bucket(store.js, TTL)
    await leases_bucket(store.js, 3.0)
    info = await store.js.stream_info(f"KV_{LEASES_BUCKET}")
    assert abs(info.config.max_age - 3.0) < 1e-3
