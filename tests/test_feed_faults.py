"""A revocation channel that dies without a word is noticed, replaced, and caught up.

Replica A reaches Redis through a fault proxy, replica B directly. The proxy
blackholes A's connections (no FIN, no RST: a firewall or NAT entry gone),
a session is cancelled through B, and the stream A holds for it must close
within seconds: A notices its silent subscription by a ping with a deadline,
subscribes again, and re-checks its open streams until the re-check succeeds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio

from tests.fake_upstream import FakeUpstream
from tests.faultproxy import FaultProxy
from tests.harness import (
    GatewayProcess,
    RedisServer,
    Replicas,
    cancel_session,
    create_session,
    open_stream,
    running,
    until_closed,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "sk-test-feed-faults"
STREAM_EVENTS = 300  # 30 s of events: far beyond what any of these tests waits


@pytest_asyncio.fixture(loop_scope="module")
async def proxy(module_redis: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(module_redis.host, module_redis.port) as running_proxy:
        yield running_proxy


@pytest_asyncio.fixture(loop_scope="module")
async def replicas(
    module_redis: RedisServer, fake: FakeUpstream, proxy: FaultProxy
) -> AsyncIterator[Replicas]:
    env = {"GATEWAY_REDIS_TIMEOUT": "1.0"}
    a = GatewayProcess(fake.url, redis_url=proxy.url(), env={**env, "GATEWAY_REPLICA_ID": "a"})
    b = GatewayProcess(fake.url, redis_url=module_redis.url, env={**env, "GATEWAY_REPLICA_ID": "b"})
    async with running((a, b)) as started:
        yield started


@dataclass(frozen=True)
class LiveStream:
    """A session created through A, streamed from A and read in the background."""

    session_id: str
    reader: asyncio.Task[tuple[int, float]]
    http: aiohttp.ClientSession
    b: GatewayProcess

    async def cancel_through_b(self) -> float:
        """Cancel the session through B, which reaches Redis directly; when it was done."""
        await cancel_session(self.http, self.b.url, self.session_id, api_key=API_KEY)
        return time.monotonic()


@pytest_asyncio.fixture(loop_scope="module")
async def stream(replicas: Replicas, http: aiohttp.ClientSession) -> AsyncIterator[LiveStream]:
    a, b = replicas
    session = await create_session(http, a.url, api_key=API_KEY)
    response = await open_stream(http, a, session["client_secret"], events=STREAM_EVENTS)
    reader = asyncio.create_task(until_closed(response))
    try:
        yield LiveStream(session["id"], reader, http, b)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_a_blackholed_subscription_is_replaced_and_the_revoked_stream_closes_in_seconds(
    stream: LiveStream, proxy: FaultProxy
) -> None:
    # Every connection A holds goes silent; new ones get through, as after a
    # NAT or load-balancer entry is lost.
    proxy.blackhole(new=False)
    revoked_at = await stream.cancel_through_b()
    async with asyncio.timeout(30):
        seen, ended = await stream.reader

    print(f"blackholed feed: stream closed {ended - revoked_at:.2f}s after the cancel")
    assert seen < STREAM_EVENTS, "the stream ran to its end"
    # Two ping intervals to notice, a resubscription, and a re-check whose
    # first try may wait out a blackholed pooled connection (1 s timeout).
    assert ended - revoked_at < 6.0, f"closed {ended - revoked_at:.2f}s after the cancel"


async def test_a_recheck_that_fails_is_retried_until_it_succeeds(
    stream: LiveStream, proxy: FaultProxy
) -> None:
    # Everything A sends to Redis vanishes, new connections included, while
    # the session is cancelled through B.
    proxy.blackhole(new=True)
    blackholed_at = await stream.cancel_through_b()

    # Until A can reach Redis again it cannot learn of the cancel (the
    # revoker keeps trying); the stream stays open meanwhile.
    done, _ = await asyncio.wait({stream.reader}, timeout=3.0)
    assert not done, "the stream closed although A could not have heard of the cancel"
    proxy.heal()
    healed_at = time.monotonic()
    async with asyncio.timeout(30):
        seen, ended = await stream.reader

    print(
        f"blackholed Redis for {healed_at - blackholed_at:.1f}s: stream closed "
        f"{ended - healed_at:.2f}s after the path healed"
    )
    assert seen < STREAM_EVENTS, "the stream ran to its end"
    assert ended - healed_at < 6.0, f"closed {ended - healed_at:.2f}s after the path healed"
