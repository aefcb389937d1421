"""A gateway started while its Redis is down serves anyway, and recovers.

Exiting would turn a Redis outage during a rollout into a crash loop. Client
routes answer 503 store_unavailable (fail closed) until Redis answers; the
outage is logged once, not once per request.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, RedisServer

SECRET = {"Authorization": "Bearer ek_never_issued_secret"}


async def _client_call(http: aiohttp.ClientSession, gateway: GatewayProcess) -> tuple[int, str]:
    async with http.post(f"{gateway.url}/v1/chatkit/conversation", json={}, headers=SECRET) as resp:
        body = await resp.json()
        return resp.status, body["error"]["code"]


async def test_gateway_starts_without_redis_and_serves_once_redis_is_back(
    upstream: FakeUpstream,
) -> None:
    redis_server = RedisServer()
    redis_server.stop()  # the port is chosen; nothing listens on it yet
    gateway = GatewayProcess(upstream.url, redis_url=redis_server.url)
    try:
        async with gateway, aiohttp.ClientSession() as http:
            # Started (/healthz answered, or astart would have raised), and fails closed.
            answers = [await _client_call(http, gateway) for _ in range(20)]
            assert answers == [(503, "store_unavailable")] * 20

            await asyncio.to_thread(redis_server.start)
            deadline = time.monotonic() + 10
            while (answer := await _client_call(http, gateway)) == (503, "store_unavailable"):
                assert time.monotonic() < deadline, "never recovered"
                await asyncio.sleep(0.05)
            # Redis answered: an unknown secret is now refused for what it is.
            assert answer == (401, "invalid_client_secret")
            async with http.get(f"{gateway.url}/readyz") as resp:
                assert resp.status == 200
        output = gateway.output()
    finally:
        redis_server.close()

    assert "chatkit-gateway ready" in output
    # One line for the outage (not one per refused request), one for the recovery.
    assert output.count("Redis is unavailable") == 1, output
    assert output.count("Redis answers again") == 1, output
