"""Long SSE streams are ChatKit's normal traffic: the upstream pool must not cap them.

With the old default pool of 512 connections, stream 513 waited for a slot and
got a 504. By default there is now no pool cap (descriptors and the client
connection cap bound a worker instead), so 600 concurrent streams through one
worker all start, and a short request is not queued behind them.
"""

from __future__ import annotations

import asyncio
import resource
import time

import aiohttp
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

STREAMS = 600  # more than the old default pool held
# Any bearer token is admitted, far below its limit: this is about capacity.
ENV = {
    "GATEWAY_UNKNOWN_SECRETS": "allow",
    "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "100000",
}
HEADERS = {"Authorization": "Bearer ek_capacity"}


def _descriptors(needed: int) -> None:
    # This process holds both ends it drives (clients and the fake upstream).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def test_more_concurrent_streams_than_the_old_pool_and_short_requests_still_pass(
    fake: FakeUpstream,
) -> None:
    _descriptors(4 * STREAMS + 256)
    async with (
        GatewayProcess(fake.url, env=ENV) as gateway,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        responses: list[aiohttp.ClientResponse] = []
        try:

            async def open_stream() -> None:
                # Each stream sends one event, then stays open (the next is 60 s away).
                response = await http.post(
                    f"{gateway.url}/v1/chatkit/conversation?events=2&interval=60",
                    json={},
                    headers={"Accept": "text/event-stream", **HEADERS},
                )
                responses.append(response)
                assert response.status == 200
                assert (await response.content.readline()).startswith(b"data: ")

            await asyncio.gather(*(open_stream() for _ in range(STREAMS)))
            assert fake.active >= STREAMS
            started = time.monotonic()
            async with http.post(
                f"{gateway.url}/v1/chatkit/conversation", json={}, headers=HEADERS
            ) as short:
                assert short.status == 200
                await short.read()
            assert time.monotonic() - started < 2.0, "a short request queued behind the streams"
        finally:
            for response in responses:
                response.close()
