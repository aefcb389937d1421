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
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio

from tests.fake_upstream import FakeUpstream
from tests.faultproxy import FaultProxy
from tests.harness import GatewayProcess, RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "sk-test-feed-faults"
CONVERSATION = "/v1/chatkit/conversation"
STREAM_EVENTS = 300  # 30 s of events: far beyond what any of these tests waits


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


@pytest_asyncio.fixture(loop_scope="module")
async def proxy(redis: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(redis.host, redis.port) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def replicas(
    redis: RedisServer, fake: FakeUpstream, proxy: FaultProxy
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    env = {"GATEWAY_REDIS_TIMEOUT": "1.0"}
    a = GatewayProcess(fake.url, redis_url=proxy.url(), env={**env, "GATEWAY_REPLICA_ID": "a"})
    b = GatewayProcess(fake.url, redis_url=redis.url, env={**env, "GATEWAY_REPLICA_ID": "b"})
    await asyncio.gather(a.astart(), b.astart())
    try:
        yield a, b
    finally:
        await asyncio.gather(a.astop(), b.astop())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def create_session(http: aiohttp.ClientSession, gateway: GatewayProcess) -> tuple[str, str]:
    async with http.post(
        f"{gateway.url}/v1/chatkit/sessions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"user": "u1", "workflow": {"id": "wf_feed"}},
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return body["id"], body["client_secret"]


async def cancel(http: aiohttp.ClientSession, gateway: GatewayProcess, session_id: str) -> None:
    async with http.post(
        f"{gateway.url}/v1/chatkit/sessions/{session_id}/cancel",
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as response:
        assert response.status == 200, await response.text()


async def open_stream(
    http: aiohttp.ClientSession, gateway: GatewayProcess, secret: str
) -> aiohttp.ClientResponse:
    response = await http.post(
        f"{gateway.url}{CONVERSATION}?events={STREAM_EVENTS}&interval=0.1",
        json={"type": "threads.create", "params": {}},
        headers={"Authorization": f"Bearer {secret}", "Accept": "text/event-stream"},
    )
    assert response.status == 200
    assert (await response.content.readline()).startswith(b"data: ")
    return response


async def until_closed(response: aiohttp.ClientResponse) -> tuple[int, float]:
    """(events read in all, monotonic time the stream ended)."""
    seen = 1
    try:
        async for line in response.content:
            seen += line.startswith(b"data: ")
    except aiohttp.ClientPayloadError:
        pass  # cut off mid-body: what closing a stream looks like to a client
    finally:
        response.release()
    return seen, time.monotonic()


async def test_a_blackholed_subscription_is_replaced_and_the_revoked_stream_closes_in_seconds(
    replicas: tuple[GatewayProcess, GatewayProcess],
    proxy: FaultProxy,
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    session_id, secret = await create_session(http, a)
    reader = asyncio.create_task(until_closed(await open_stream(http, a, secret)))

    # Every connection A holds goes silent; new ones get through, as after a
    # NAT or load-balancer entry is lost.
    proxy.blackhole(new=False)
    await cancel(http, b, session_id)
    revoked_at = time.monotonic()
    async with asyncio.timeout(30):
        seen, ended = await reader

    print(f"blackholed feed: stream closed {ended - revoked_at:.2f}s after the cancel")
    assert seen < STREAM_EVENTS, "the stream ran to its end"
    # Two ping intervals to notice, a resubscription, and a re-check whose
    # first try may wait out a blackholed pooled connection (1 s timeout).
    assert ended - revoked_at < 6.0, f"closed {ended - revoked_at:.2f}s after the cancel"


async def test_a_recheck_that_fails_is_retried_until_it_succeeds(
    replicas: tuple[GatewayProcess, GatewayProcess],
    proxy: FaultProxy,
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    session_id, secret = await create_session(http, a)
    reader = asyncio.create_task(until_closed(await open_stream(http, a, secret)))

    # Everything A sends to Redis vanishes, new connections included, while
    # the session is cancelled through B.
    proxy.blackhole(new=True)
    await cancel(http, b, session_id)
    blackholed_at = time.monotonic()

    # Until A can reach Redis again it cannot learn of the cancel (the
    # revoker keeps trying); the stream stays open meanwhile.
    done, _ = await asyncio.wait({reader}, timeout=3.0)
    assert not done, "the stream closed although A could not have heard of the cancel"
    proxy.heal()
    healed_at = time.monotonic()
    async with asyncio.timeout(30):
        seen, ended = await reader

    print(
        f"blackholed Redis for {healed_at - blackholed_at:.1f}s: stream closed "
        f"{ended - healed_at:.2f}s after the path healed"
    )
    assert seen < STREAM_EVENTS, "the stream ran to its end"
    assert ended - healed_at < 6.0, f"closed {ended - healed_at:.2f}s after the path healed"
